"""Importing the authors' released fusion weights (taemi.release)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_official_model
from safetensors.torch import save_file

from taemi import EMI_EMOTIONS
from taemi.config import preset
from taemi.data.batch import Batch
from taemi.inference import load_run
from taemi.model.taemi import TAEMI
from taemi.release import (
    FUSION_KEYS,
    ReleaseImportError,
    convert_release_state,
    export_release_state,
    import_release,
    read_release_state,
)

DA, DV, DT, H, HH = 7, 5, 6, 8, 12  # tiny audio/vision/text dims, hidden, head hidden


def _official_model(seed: int = 0) -> TAEMI:
    return tiny_official_model(DA, DV, DT, seed=seed, hidden=H)


def _batch(seed: int = 1, B: int = 4) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ta, tv = 9, 6
    audio_mask = torch.arange(ta) < torch.tensor([9, 3, 5, 1]).view(-1, 1)
    vision_mask = torch.arange(tv) < torch.tensor([6, 2, 4, 6]).view(-1, 1)
    missing = torch.tensor(
        [[False, False, False], [True, False, False], [False, True, True], [False, False, False]]
    )
    return Batch(
        audio=torch.randn(B, ta, DA, generator=g),
        audio_mask=audio_mask,
        vision=torch.randn(B, tv, DV, generator=g),
        vision_mask=vision_mask,
        text=torch.randn(B, DT, generator=g),
        missing=missing,
    )


def _release_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return export_release_state(_official_model(seed))


# --------------------------------------------------------------------------- mapping


def test_export_uses_release_names_and_shapes() -> None:
    state = _release_state()
    assert set(state) == set(FUSION_KEYS)
    assert state["miss_audio"].shape == (1, 1, DA)
    assert state["miss_vision"].shape == (1, 1, DV)
    assert state["miss_text"].shape == (1, DT)
    assert state["ca_audio.q_proj.weight"].shape == (H, DT)
    assert state["ca_audio.k_proj.weight"].shape == (H, DA)
    assert state["ca_vision.v_proj.weight"].shape == (H, DV)
    assert state["pred_head.0.weight"].shape == (HH, DT + 2 * H)
    assert state["pred_head.3.weight"].shape == (len(EMI_EMOTIONS), HH)


def test_convert_infers_sizes_and_inverts_export() -> None:
    model = _official_model()
    cfg, ours, ignored = convert_release_state(export_release_state(model))
    assert (
        cfg.preset == "official"
        and cfg.model.align is False
        and cfg.model.fusion == "cross_attention"
    )
    m = cfg.model
    assert (m.audio_dim, m.vision_dim, m.text_dim, m.hidden, m.heads, m.head_hidden) == (
        DA,
        DV,
        DT,
        H,
        4,
        HH,
    )
    assert cfg.data.emotions == EMI_EMOTIONS
    assert ignored == []
    expected = model.state_dict()
    assert set(ours) == set(expected)
    for k, v in expected.items():
        assert ours[k].shape == v.shape, k
        assert torch.equal(ours[k], v), k


def test_convert_accepts_flat_tokens() -> None:
    state = _release_state()
    state["miss_audio"] = state["miss_audio"].reshape(DA)
    _, ours, _ = convert_release_state(state)
    assert ours["missing.audio"].shape == (DA,)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, fmt: str) -> None:
    model = _official_model()
    state = export_release_state(model)
    ckpt = tmp_path / f"release.{fmt}"
    if fmt == "pt":
        torch.save(state, ckpt)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    out = import_release(ckpt, tmp_path / "run")
    assert out == tmp_path / "run"
    for name in ("config.yaml", "best.safetensors", "last.safetensors", "import.json"):
        assert (out / name).is_file(), name
    loaded, cfg = load_run(out)
    assert cfg.preset == "official" and cfg.model.hidden == H
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)
    info = json.loads((out / "import.json").read_text())
    assert info["source"] == str(ckpt)
    assert (
        len(info["sha256"]) == 64 and info["ignored_keys"] == 0 and info["ignored_examples"] == []
    )


def test_import_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "release.pt"
    torch.save(_release_state(), ckpt)
    import_release(ckpt, tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a run"):
        import_release(ckpt, tmp_path / "run")


def test_custom_emotions(tmp_path: Path) -> None:
    state = _release_state()
    emotions = ("a", "b", "c", "d", "e", "f")
    cfg, _, _ = convert_release_state(state, emotions=emotions)
    assert cfg.data.emotions == emotions


# --------------------------------------------------------------------------- containers


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [
        (
            lambda s: {"epoch": 7, "state_dict": s, "hyper_parameters": {"lr": 1e-4}},
            "model.fusion.",
        ),
        (lambda s: {"model": s}, "module."),
        (lambda s: {"model_state_dict": {"module": s}}, ""),
        (lambda s: {"checkpoint": 1, "model": s}, "_orig_mod.fusion_model."),
        (lambda s: s, "fusion."),
    ],
)
def test_nested_containers_and_prefixes_are_unwrapped(
    tmp_path: Path, wrap: object, prefix: str
) -> None:
    model = _official_model()
    release = export_release_state(model)
    backbone = {
        "audio_encoder.wav2vec2.encoder.layers.0.attention.q_proj.weight": torch.randn(3, 3),
        "text_encoder.embeddings.word_embeddings.weight": torch.randn(4, 2),
    }
    flat = {prefix + k: v for k, v in release.items()}
    flat.update(
        {("model." if prefix.startswith("model.") else "") + k: v for k, v in backbone.items()}
    )
    ckpt = tmp_path / "release.ckpt"
    torch.save(wrap(flat), ckpt)  # type: ignore[operator]

    state = read_release_state(ckpt)
    for k in FUSION_KEYS:
        assert torch.equal(state[k], release[k]), k
    _, _, ignored = convert_release_state(state)
    assert len(ignored) == 2
    assert all("encoder" in k and k not in FUSION_KEYS for k in ignored)

    out = import_release(ckpt, tmp_path / "run")
    info = json.loads((out / "import.json").read_text())
    assert info["ignored_keys"] == 2 and sorted(info["ignored_examples"]) == sorted(ignored)
    loaded, _ = load_run(out)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)


def test_prefix_in_safetensors_is_stripped(tmp_path: Path) -> None:
    release = _release_state()
    ckpt = tmp_path / "release.safetensors"
    save_file({"module._orig_mod." + k: v.contiguous() for k, v in release.items()}, str(ckpt))
    state = read_release_state(ckpt)
    assert set(state) == set(FUSION_KEYS)


def test_two_fusion_models_are_ambiguous(tmp_path: Path) -> None:
    release = _release_state()
    both = {**release, **{"module." + k: v for k, v in release.items()}}
    ckpt = tmp_path / "two.pt"
    torch.save(both, ckpt)
    with pytest.raises(ReleaseImportError, match="several fusion models"):
        read_release_state(ckpt)


# --------------------------------------------------------------------------- errors


def test_missing_key_is_listed(tmp_path: Path) -> None:
    state = _release_state()
    del state["ca_vision.ln_kv.bias"]
    del state["miss_text"]
    ckpt = tmp_path / "broken.pt"
    torch.save(state, ckpt)
    with pytest.raises(ReleaseImportError) as e:
        import_release(ckpt, tmp_path / "run")
    msg = str(e.value)
    assert str(ckpt) in msg and "ca_vision.ln_kv.bias" in msg and "miss_text" in msg
    assert not (tmp_path / "run").exists()


def test_unknown_prefix_is_hinted() -> None:
    state = {"encoder." + k: v for k, v in _release_state().items()}
    with pytest.raises(ReleaseImportError, match="encoder.ca_audio.q_proj.weight"):
        convert_release_state(state)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("ca_vision.v_proj.weight", (H, DV + 1)),  # inconsistent with ca_vision.k_proj
        ("ca_vision.q_proj.weight", (H, DT + 2)),  # query dim disagrees with ca_audio
        ("ca_audio.out_proj.weight", (H, H + 4)),
        ("ca_audio.ln_q.weight", (H + 1,)),
        ("pred_head.0.weight", (HH, DT + 2 * H + 1)),
        ("pred_head.3.bias", (len(EMI_EMOTIONS) + 1,)),
        ("miss_audio", (1, 1, DA + 1)),
        ("miss_vision", (2, 1, DV)),
    ],
)
def test_shape_mismatch_names_the_key(tmp_path: Path, key: str, shape: tuple[int, ...]) -> None:
    state = _release_state()
    state[key] = torch.randn(shape)
    ckpt = tmp_path / "bad.safetensors"
    save_file(state, str(ckpt))
    with pytest.raises(ReleaseImportError) as e:
        import_release(ckpt, tmp_path / "run")
    assert key in str(e.value) and str(tuple(shape)) in str(e.value) and str(ckpt) in str(e.value)


def test_wrong_number_of_outputs() -> None:
    state = _release_state()
    with pytest.raises(ReleaseImportError, match=r"6 output rows but 4 emotions"):
        convert_release_state(state, emotions=("a", "b", "c", "d"))


def test_hidden_not_divisible_by_release_heads() -> None:
    state = _release_state()
    h = 6  # 6 % 4 != 0: a consistent state, but not one 4 heads can split
    for m, kv in (("audio", DA), ("vision", DV)):
        state[f"ca_{m}.q_proj.weight"] = torch.randn(h, DT)
        state[f"ca_{m}.k_proj.weight"] = torch.randn(h, kv)
        state[f"ca_{m}.v_proj.weight"] = torch.randn(h, kv)
        state[f"ca_{m}.out_proj.weight"] = torch.randn(h, h)
        for part in ("q_proj", "k_proj", "v_proj", "out_proj", "ln_q", "ln_kv"):
            state[f"ca_{m}.{part}.bias"] = torch.randn(h)
        state[f"ca_{m}.ln_q.weight"] = torch.randn(h)
        state[f"ca_{m}.ln_kv.weight"] = torch.randn(h)
    state["pred_head.0.weight"] = torch.randn(HH, DT + 2 * h)
    with pytest.raises(ReleaseImportError, match="not divisible"):
        convert_release_state(state)


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReleaseImportError, match="does not exist"):
        read_release_state(tmp_path / "nope.pt")
    p = tmp_path / "weights.npz"
    p.write_bytes(b"x")
    with pytest.raises(ReleaseImportError, match="unsupported file type"):
        read_release_state(p)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ReleaseImportError, match="garbage.safetensors"):
        read_release_state(bad)


def test_non_dict_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(ReleaseImportError, match="expected a dict of tensors"):
        read_release_state(p)


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    state: dict[str, object] = dict(_release_state())
    state["payload"] = _Evil(marker)
    ckpt = tmp_path / "evil.pth"
    if writer == "pickle":
        with ckpt.open("wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, ckpt)
    assert not marker.exists()
    with pytest.raises(ReleaseImportError, match="weights_only") as e:
        import_release(ckpt, tmp_path / "run")
    assert str(ckpt) in str(e.value)
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "run").exists()


def test_export_refuses_other_architectures() -> None:
    cfg = dataclasses.replace(
        preset("paper").model,
        audio_dim=DA,
        vision_dim=DV,
        text_dim=DT,
        hidden=H,
        heads=4,
        sa_ffn=16,
        head_hidden=HH,
    )
    with pytest.raises(ValueError, match="official architecture"):
        export_release_state(TAEMI(cfg))
    cfg2 = dataclasses.replace(
        preset("official").model, audio_dim=DA, vision_dim=DV, text_dim=DT, hidden=H, heads=2
    )
    with pytest.raises(ValueError, match="heads"):
        export_release_state(TAEMI(cfg2))
