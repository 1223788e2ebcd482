"""Importing the authors' whole checkpoint (fine-tuned wav2vec2 emotion model + text model +
fusion) as a fine-tuning run: ``taemi import-release CKPT --out RUN --model audio=DIR
text=DIR`` (taemi.release).

The "release" is assembled as the authors save theirs: one flat state dict with
``audio_model.*`` (a Hugging Face wav2vec2 emotion model's state_dict), ``text_model.*``
(a Hugging Face BERT ``AutoModel``'s state_dict, pooler included) and the fusion keys
(:func:`taemi.release.export_release_state`). The model folders passed with ``--model``
hold the same tiny architectures with OTHER (pretrained-like) weights, so a test passes
only if every tensor comes from the checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import run_main, tiny_official_model
from finetune_helpers import make_bert_dir, make_finetune_store, make_w2v_dir, tiny_w2v_config
from safetensors.torch import load_file

from taemi import EMI_EMOTIONS
from taemi.data.labels import read_labels
from taemi.eval.metrics import compute_metrics
from taemi.finetune.model import FinetuneModel
from taemi.inference import Predictor
from taemi.model.taemi import TAEMI
from taemi.release import ReleaseImportError, export_release_state, import_release
from taemi.store import FeatureStore

W2V = {"conv_kernel": (32, 10), "conv_stride": (16, 10)}  # 100 frames/s: short sequences
DV, H, HH = 6, 8, 12  # vision dim, fusion hidden, head hidden
DA, DT = 32 + 3, 16  # the tiny backbones' outputs: wav2vec2 hidden + 3 head outputs, BERT


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initial value (LayerNorms too), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def _source_modules(w2v_dir: Path, bert_dir: Path) -> SimpleNamespace:
    """The authors' fine-tuned modules: the folders' architectures, other weights."""
    from transformers import AutoModel

    from taemi.backbones.wav2vec2 import Wav2Vec2EmotionModel

    torch.manual_seed(11)
    audio = _perturb(Wav2Vec2EmotionModel(tiny_w2v_config(layerdrop=0.0, **W2V)), 1)
    torch.manual_seed(12)
    text = _perturb(AutoModel.from_config(AutoModel.from_pretrained(bert_dir).config), 2)
    fusion = tiny_official_model(DA, DV, DT, seed=13, hidden=H)
    return SimpleNamespace(audio=audio, text=text, fusion=fusion)


def release_state(src: SimpleNamespace) -> dict[str, torch.Tensor]:
    """One flat dict, as ``torch.save(model.state_dict())`` of the authors' model gives it."""
    state = {f"audio_model.{k}": v.clone() for k, v in src.audio.state_dict().items()}
    state |= {f"text_model.{k}": v.clone() for k, v in src.text.state_dict().items()}
    return state | export_release_state(src.fusion)


@pytest.fixture(scope="module")
def rel(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("release_backbones")
    w2v = make_w2v_dir(root / "w2v", seed=0, **W2V)
    bert = make_bert_dir(root / "bert", seed=2)
    # the release keeps 12 s of audio (finetune.max_audio_seconds); the clips are short
    store, _, valid = make_finetune_store(
        root, n=16, vision_dim=DV, max_seconds=12.0, clip_seconds=1.5
    )
    src = _source_modules(w2v, bert)
    state = release_state(src)
    ckpt = root / "release.pt"
    torch.save(state, ckpt)
    run = import_release(ckpt, root / "run", models={"audio": w2v, "text": bert})
    return SimpleNamespace(
        root=root, w2v=w2v, bert=bert, store=store, valid=valid, src=src, state=state,
        ckpt=ckpt, run=run,
    )  # fmt: skip


def test_every_tensor_of_the_import_is_the_checkpoints(rel) -> None:
    run = rel.run
    assert "mode: finetune" in (run / "config.yaml").read_text()
    assert (run / "backbones" / "audio").is_dir() and (run / "backbones" / "text").is_dir()
    ours = {k: v.float() for k, v in load_file(str(run / "best.safetensors")).items()}
    w2v, bert = (m.state_dict() for m in (rel.src.audio, rel.src.text))
    for k, v in w2v.items():
        assert torch.equal(ours.pop(f"audio.model.{k}"), v), k
    for k, v in bert.items():
        if k.startswith("pooler."):  # the backbone builds no pooler
            continue
        assert torch.equal(ours.pop(f"text.model.{k}"), v), k
    for k, v in rel.src.fusion.state_dict().items():
        assert torch.equal(ours.pop(f"fusion.{k}"), v), k
    for k in [k for k in ours if k.startswith("text.layers.")]:  # TextBackbone.layers: aliases
        assert torch.equal(ours.pop(k), bert[k.replace("text.layers.", "encoder.layer.")]), k
    assert not ours  # nothing else in the run's weights
    info = json.loads((run / "import.json").read_text())
    n_bert = sum(not k.startswith("pooler.") for k in bert)
    assert info["mapped"] == {
        "fusion": len(rel.src.fusion.state_dict()),
        "audio": len(w2v),
        "text": n_bert,
    }
    assert info["ignored_backbone_keys"] == [
        "text_model.pooler.dense.bias",
        "text_model.pooler.dense.weight",
    ]
    assert info["mode"] == "finetune" and info["ignored_keys"] == 0 and len(info["sha256"]) == 64
    # the folders' own (pretrained) weights were replaced, not kept
    folder = load_file(str(rel.w2v / "model.safetensors"))
    key = next(k for k in folder if k.endswith("encoder.layers.0.attention.k_proj.weight"))
    assert not torch.equal(folder[key], w2v[key])


def _reference_model(src: SimpleNamespace, bert_dir: Path) -> FinetuneModel:
    """The FinetuneModel built directly from the source modules (no import involved)."""
    from transformers import AutoTokenizer

    from taemi.backbones.text import TextBackbone
    from taemi.backbones.wav2vec2 import Wav2Vec2Backbone

    audio = Wav2Vec2Backbone(src.audio, normalize=True, max_seconds=12.0, name="source")
    text = TextBackbone(
        src.text, AutoTokenizer.from_pretrained(bert_dir), pooling="cls", normalize=False,
        max_tokens=128, name="source",
    )  # fmt: skip
    return FinetuneModel(audio, text, src.fusion).eval()


def test_imported_run_predicts_as_the_source_modules(rel, tmp_path) -> None:
    store, labels = FeatureStore(rel.store), read_labels(rel.valid)
    predictor = Predictor.from_run(rel.run)
    dataset = predictor.dataset(store, labels)
    got = predictor.predict(dataset)
    reference = _reference_model(rel.src, rel.bert)
    with torch.no_grad():
        want = reference(dataset.collator()([dataset[i] for i in range(len(dataset))]))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-4)
    assert np.ptp(got, axis=0).min() > 0  # not a constant: the inputs matter

    out = tmp_path / "eval.json"
    code, text = run_main(
        ["evaluate", "--run", str(rel.run), "--store", str(rel.store), "--labels",
         str(rel.valid), "--no-progress", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, text
    expected = compute_metrics(want.numpy(), labels.values, labels.emotions).mean_pearson
    assert json.loads(out.read_text())["mean_pearson"] == pytest.approx(expected, abs=1e-5)
    sub = tmp_path / "sub.csv"
    code, text = run_main(
        ["predict", "--run", str(rel.run), "--store", str(rel.store), "--ids", str(rel.valid),
         "--out", str(sub), "--no-progress"]
    )  # fmt: skip
    assert code == 0, text and sub.is_file()


def _import(rel, state: dict, name: str, **kw) -> Path:
    ckpt = rel.root / f"{name}.pt"
    torch.save(state, ckpt)
    kw.setdefault("models", {"audio": rel.w2v, "text": rel.bert})
    return import_release(ckpt, rel.root / f"run_{name}", **kw)


def test_old_weight_norm_names_containers_and_prefixes(rel) -> None:
    """weight_g/weight_v (torch's old weight_norm), under {"state_dict": {"module.…"}}."""
    renamed = {}
    for k, v in rel.state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        renamed[f"module.{k}"] = v
    assert any(k.endswith("weight_g") for k in renamed)
    run = _import(rel, {"state_dict": renamed, "epoch": 3}, "layout")
    a, b = (load_file(str(r / "best.safetensors")) for r in (rel.run, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


MISSING = (
    r"release checkpoint .*missing\.pt.*audio backbone.*missing from the checkpoint.*"
    r"audio_model\.wav2vec2\.encoder\.layers\.1\.final_layer_norm\.weight"
)
EXTRA = (
    r"release checkpoint .*extra\.pt.*unexpected text_model\.\* key.*"
    r"text_model\.encoder\.layer\.9\.output\.dense\.weight"
)
NONE = (
    r"release checkpoint .*no_backbones\.pt holds no audio_model\.\* or "
    r"text_model\.\* tensors.*drop --model"
)


@pytest.mark.parametrize(
    ("change", "match"), [("drop", MISSING), ("extra", EXTRA), ("no_backbones", NONE)]
)
def test_a_checkpoint_that_does_not_fit_is_refused(rel, change: str, match: str) -> None:
    state = dict(rel.state)
    if change == "drop":
        del state["audio_model.wav2vec2.encoder.layers.1.final_layer_norm.weight"]
    elif change == "extra":
        state["text_model.encoder.layer.9.output.dense.weight"] = torch.zeros(16, 32)
    else:
        state = {
            k: v for k, v in state.items() if not k.startswith(("audio_model.", "text_model."))
        }
    name = {"drop": "missing"}.get(change, change)
    with pytest.raises(ReleaseImportError, match=match):
        _import(rel, state, name)
    assert not (rel.root / f"run_{name}").exists()  # nothing written


def test_model_folders_of_another_architecture_are_refused(rel) -> None:
    wide = make_w2v_dir(rel.root / "w2v_wide", intermediate_size=41, **W2V)
    with pytest.raises(
        ReleaseImportError,
        match=r"release checkpoint .*shape\.pt.*--model audio=.*w2v_wide.*"
        r"feed_forward\.intermediate_dense\.weight \(37, 32\).* vs \(41, 32\)",
    ):
        _import(rel, rel.state, "shape", models={"audio": wide, "text": rel.bert})
    narrow = make_w2v_dir(rel.root / "w2v_narrow", hidden_size=24, **W2V)
    with pytest.raises(
        ReleaseImportError,
        match=r"release checkpoint .*dims\.pt: its fusion model reads audio features of size "
        r"35 .*w2v_narrow gives 27",
    ):
        _import(rel, rel.state, "dims", models={"audio": narrow, "text": rel.bert})


def test_bad_model_roles_are_refused(rel, capsys) -> None:
    code, _ = run_main(
        ["import-release", str(rel.ckpt), "--out", str(rel.root / "run_roles"),
         "--model", f"audio={rel.w2v}", f"vision={rel.bert}"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "release.pt" in err
        and "unknown role(s) ['vision']" in err
        and "missing role(s) ['text']" in err
    )
    with pytest.raises(ValueError, match=r"release\.pt.*missing role\(s\) \['audio'\]"):
        import_release(rel.ckpt, rel.root / "run_roles", models={"text": rel.bert})
    assert not (rel.root / "run_roles").exists()


def test_without_model_the_backbones_are_ignored_with_a_warning(rel, caplog) -> None:
    fusion_only = {
        k: v for k, v in rel.state.items() if not k.startswith(("audio_model.", "text_model."))
    }
    plain = _import(rel, fusion_only, "plain", models=None)
    with caplog.at_level(logging.WARNING, logger="taemi.release"):
        code, text = run_main(
            ["import-release", str(rel.ckpt), "--out", str(rel.root / "run_fusion")]
        )
    assert code == 0, text
    assert "--model audio=DIR text=DIR" in caplog.text and "audio_model.*" in caplog.text
    run = rel.root / "run_fusion"
    a, b = (load_file(str(r / "best.safetensors")) for r in (plain, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (plain / "config.yaml").read_text() == (run / "config.yaml").read_text()
    assert "mode: frozen" in (run / "config.yaml").read_text() and not (run / "backbones").exists()
    info = json.loads((run / "import.json").read_text())
    n_backbone = sum(k.startswith(("audio_model.", "text_model.")) for k in rel.state)
    assert info["ignored_keys"] == n_backbone and set(info) == set(
        json.loads((plain / "import.json").read_text())
    )


@pytest.mark.slow
def test_predict_from_media_with_the_imported_run(rel, tmp_path) -> None:
    """``--features STORE`` records how the vision features were made, so ``taemi predict
    --run RUN VIDEO`` extracts them (here the offline profile's 384-d DINOv2 features:
    the paper profile's models are not available offline) plus the waveform and the
    transcript that the fine-tuned backbones read; it predicts what the run predicts on
    the store extracted from the same clip."""
    from conftest import generated_media_corpus

    corpus = generated_media_corpus(tmp_path)
    clip = corpus.raw / "00001.mp4"
    store = tmp_path / "store"
    code, text = run_main(
        ["extract", "--input", str(clip), "--out", str(store), "--max-frames", "2",
         "--frame-policy", "uniform", "--no-face", "--waveforms", "--no-progress"]
    )  # fmt: skip
    assert code == 0, text
    cfg = dataclasses.replace(rel.src.fusion.cfg, vision_dim=FeatureStore(store).dims["vision"])
    torch.manual_seed(14)
    fusion = _perturb(TAEMI(cfg, num_outputs=len(EMI_EMOTIONS)), 4)
    src = SimpleNamespace(audio=rel.src.audio, text=rel.src.text, fusion=fusion)
    run = _import(rel, release_state(src), "media", features=store)
    assert json.loads((run / "features.json").read_text())["backbones"]["audio"]
    out = tmp_path / "preds.csv"
    code, text = run_main(
        ["predict", "--run", str(run), str(clip), "--out", str(out), "--no-clip", "--no-progress"]
    )  # fmt: skip
    assert code == 0, text
    got = json.loads(out.with_suffix(".json").read_text())["clips"]
    assert [c["id"] for c in got] == ["00001"] and got[0]["missing"] == []
    predictor = Predictor.from_run(run)
    want = predictor.predict(predictor.dataset(FeatureStore(store), ids=["00001"]))[0]
    np.testing.assert_allclose(
        [got[0]["intensities"][e] for e in EMI_EMOTIONS], want, atol=1e-5, rtol=1e-4
    )
