"""End-to-end fine-tuning (``taemi train --mode finetune``) with tiny random Hugging Face
backbones built in the tests (wav2vec2 emotion model, BERT): the run folder, gradient flow
into trainable backbone weights only, per-sample audio masks, exact resume with waveform
augmentation on, and ``taemi evaluate`` / ``taemi predict`` on the saved run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from finetune_helpers import make_bert_dir, make_finetune_store, make_w2v_dir
from safetensors.torch import load_file

pytest.importorskip("transformers")

from conftest import run_main

from taemi.config import build_config, parse_overrides
from taemi.data.labels import read_labels
from taemi.finetune.data import FinetuneBatch, FinetuneDataset
from taemi.finetune.model import FinetuneModel
from taemi.inference import load_run
from taemi.model.taemi import TAEMI
from taemi.run import STATE_FILE
from taemi.store import FeatureStore
from taemi.store.waveforms import WaveformCacheError
from taemi.train.modes import make_dataset
from taemi.train.trainer import train

TINY = [
    "model.hidden=16",
    "model.heads=2",
    "model.sa_ffn=32",
    "model.head_hidden=16",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.device=cpu",
    "train.precision=fp32",
    "train.patience=0",
    "finetune.max_audio_seconds=2.0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    store, train_csv, valid_csv = make_finetune_store(root, n=40)
    return {
        "store": store,
        "train": train_csv,
        "valid": valid_csv,
        # 160 samples per frame (100 frames/s): short sequences keep the tests fast
        "w2v": make_w2v_dir(root / "w2v", conv_kernel=(32, 10), conv_stride=(16, 10)),
        "bert": make_bert_dir(root / "bert"),
    }


def config(data, *extra: str):
    sets = [
        *TINY,
        "mode=finetune",
        f"finetune.audio_backbone={data['w2v']}",
        f"finetune.text_backbone={data['bert']}",
        "model.vision_dim=6",
        *extra,
    ]
    return build_config("paper", parse_overrides(sets))


def labels(data):
    return read_labels(data["train"]), read_labels(data["valid"])


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    cfg = config(data, "train.max_epochs=2", "finetune.freeze_text_layers=1")
    res = train(cfg, FeatureStore(data["store"]), *labels(data), run, progress=False)
    return res


def test_run_folder_holds_backbones_and_fusion(trained) -> None:
    run = trained.run_dir
    assert (run / "backbones" / "audio").is_dir() and (run / "backbones" / "text").is_dir()
    keys = load_file(str(run / "best.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"audio", "text", "fusion"}
    cfg_text = (run / "config.yaml").read_text()
    assert "mode: finetune" in cfg_text
    features = json.loads((run / "features.json").read_text())
    assert set(features["backbones"]) == {"audio", "text"}
    model, cfg = load_run(run)
    assert (
        isinstance(model, FinetuneModel) and type(model.fusion) is TAEMI
    )  # the frozen mode's fusion code
    assert (cfg.model.audio_dim, cfg.model.text_dim) == (
        35,
        16,
    )  # the backbones' sizes: 32 + 3 head outputs, 16
    assert len(trained.history) == 2 and all(
        np.isfinite(r["valid_mean_pearson"]) for r in trained.history
    )


def test_trainable_backbone_weights_move_frozen_ones_do_not(trained, data) -> None:
    from safetensors.torch import load_file as load

    w = load_file(str(trained.run_dir / "last.safetensors"))
    w2v = load(str(data["w2v"] / "model.safetensors"))
    bert = load(str(data["bert"] / "model.safetensors"))

    def moved(key_run: str, ref: torch.Tensor) -> bool:
        return not torch.equal(w[key_run], ref)

    # feature encoder frozen by default; the transformer layers train
    conv = next(k for k in w2v if "feature_extractor.conv_layers.0.conv.weight" in k)
    assert not moved(f"audio.model.{conv}", w2v[conv])
    layer = next(k for k in w2v if "encoder.layers.1.feed_forward.output_dense.weight" in k)
    assert moved(f"audio.model.{layer}", w2v[layer])
    # finetune.freeze_text_layers=1: embeddings and layer 0 fixed, layer 1 trains
    emb = next(k for k in bert if k.endswith("embeddings.word_embeddings.weight"))
    l0 = next(k for k in bert if k.endswith("encoder.layer.0.output.dense.weight"))
    l1 = next(k for k in bert if k.endswith("encoder.layer.1.output.dense.weight"))
    key = lambda k: "text.model." + k.removeprefix("bert.")
    assert not moved(key(emb), bert[emb]) and not moved(key(l0), bert[l0])
    assert moved(key(l1), bert[l1])


def test_a_short_clip_predicts_the_same_alone_and_beside_a_long_one(trained, data) -> None:
    model, cfg = load_run(trained.run_dir)
    store = FeatureStore(data["store"])
    ds = make_dataset(cfg, store, read_labels(data["valid"]))
    coll = ds.collator()
    lengths = [ds.waveforms.length(i) for i in ds.ids]
    short, long_ = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[long_] > 2 * lengths[short]
    with torch.no_grad():
        alone = model(coll([ds[short]]))
        pair = model(coll([ds[long_], ds[short]]))
    torch.testing.assert_close(pair[1], alone[0], atol=1e-5, rtol=1e-4)


def test_evaluate_and_predict_use_the_fine_tuned_run(trained, data, tmp_path) -> None:
    run = trained.run_dir
    code, out = run_main(
        [
            "evaluate",
            "--run",
            str(run),
            "--store",
            str(data["store"]),
            "--labels",
            str(data["valid"]),
            "--which",
            "best",
            "--no-progress",
            "--out",
            str(tmp_path / "e.json"),
        ]
    )
    assert code == 0, out
    best = json.loads((run / "metrics.json").read_text())["valid"]["mean_pearson"]
    assert json.loads((tmp_path / "e.json").read_text())["mean_pearson"] == pytest.approx(
        best, abs=1e-5
    )
    sub = tmp_path / "sub.csv"
    code, out = run_main(
        [
            "predict",
            "--run",
            str(run),
            "--store",
            str(data["store"]),
            "--ids",
            str(data["valid"]),
            "--out",
            str(sub),
            "--no-progress",
        ]
    )
    assert code == 0, out
    with open(sub, newline="") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == 1 + 10 and all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])


class Stop(Exception):
    pass


def test_resume_with_augmentation_is_exact(data, tmp_path) -> None:
    cfg = config(
        data,
        "train.max_epochs=2",
        "finetune.augment.noise_prob=0.5",
        "finetune.augment.shift_prob=0.5",
        "finetune.augment.shift_seconds=0.2",
    )
    store = FeatureStore(data["store"])
    a = train(cfg, store, *labels(data), tmp_path / "a", progress=False)

    def interrupt(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, *labels(data), tmp_path / "b", progress=False, callbacks=[interrupt])
    b = train(cfg, store, *labels(data), tmp_path / "b", resume=True, progress=False)
    assert [r["valid_mean_pearson"] for r in a.history] == [
        r["valid_mean_pearson"] for r in b.history
    ]
    wa, wb = (load_file(str(r.run_dir / "last.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "b" / STATE_FILE).is_file()


def test_augmentation_depends_on_seed_epoch_and_clip_only(data) -> None:
    cfg = config(data, "finetune.augment.noise_prob=1.0")
    store = FeatureStore(data["store"])
    ds = make_dataset(cfg, store, read_labels(data["train"]), training=True)
    assert isinstance(ds, FinetuneDataset)
    ds.set_epoch(1)
    first = ds[0].waveform
    assert np.array_equal(first, ds[0].waveform)  # same (seed, epoch, clip): same draw
    ds.set_epoch(2)
    assert not np.array_equal(first, ds[0].waveform)
    plain = make_dataset(cfg, store, read_labels(data["train"]))  # evaluation: never augmented
    assert np.array_equal(plain[0].waveform, plain[0].waveform) and not np.array_equal(
        plain[0].waveform, first
    )


def test_missing_modalities_reach_the_fusion_model_as_missing(data) -> None:
    cfg = config(data)
    store = FeatureStore(data["store"])
    ds = make_dataset(cfg, store, read_labels(data["train"]))
    batch: FinetuneBatch = ds.collator()(
        [ds[3], ds[5], ds[7], ds[0]]
    )  # no audio, no text, no face, complete
    assert batch.missing.tolist() == [
        [True, False, False],
        [False, False, True],
        [False, True, False],
        [False, False, False],
    ]
    assert batch.wave_lengths[0] == 0 and batch.texts[1] == ""


def test_a_store_without_waveforms_is_a_clear_error(data, tmp_path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(data["store"], bare)
    shutil.rmtree(bare / "waveforms")
    with pytest.raises(WaveformCacheError, match="--waveforms"):
        make_dataset(config(data), FeatureStore(bare), read_labels(data["train"]))
    (bare / "waveforms").mkdir()  # a cache missing one clip's waveform
    shutil.copy(data["store"] / "waveforms" / "manifest.json", bare / "waveforms")
    for f in (data["store"] / "waveforms").glob("*.npy"):
        if f.stem != "00001":
            shutil.copy(f, bare / "waveforms")
    with pytest.raises(FileNotFoundError, match="00001.*--waveforms"):
        make_dataset(config(data), FeatureStore(bare), read_labels(data["train"]))


def test_cli_train_mode_finetune(data, tmp_path) -> None:
    run = tmp_path / "cli"
    sets = [
        a
        for s in [
            *TINY,
            "train.max_epochs=1",
            f"finetune.audio_backbone={data['w2v']}",
            f"finetune.text_backbone={data['bert']}",
            "train.grad_accum_steps=2",
        ]
        for a in ("--set", s)
    ]
    code, out = run_main(
        [
            "train",
            "--mode",
            "finetune",
            "--store",
            str(data["store"]),
            "--train",
            str(data["train"]),
            "--valid",
            str(data["valid"]),
            "--out",
            str(run),
            "--no-progress",
            *sets,
        ]
    )
    assert code == 0, out
    assert "mode: finetune" in (run / "config.yaml").read_text()


def test_bf16_autocast_and_gradient_checkpointing_train(data, tmp_path) -> None:
    cfg = config(
        data,
        "train.max_epochs=1",
        "train.precision=bf16",
        "finetune.gradient_checkpointing=true",
        "finetune.freeze_audio_layers=1",
    )
    res = train(cfg, FeatureStore(data["store"]), *labels(data), tmp_path / "bf16", progress=False)
    assert np.isfinite(res.history[0]["train_loss"]) and np.isfinite(res.history[0]["valid_loss"])
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert metrics["precision"] == "bf16"
    # autocast casts at each use here: checkpointing recomputes with the modules' parameters
    assert "precast_parameters" not in metrics["execution"]["step"]
