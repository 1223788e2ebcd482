"""The int8 DINOv2 image encoder (``precision="int8"``, taemi.backbones.dinov2): close to
fp32 on a real face crop, recorded in the provenance, cached and rebuilt when damaged,
refused when asked for an unknown precision, and taken from a run's features.json by
``taemi predict``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from taemi.backbones import dinov2
from taemi.backbones.base import ModelLoadError


def _crema_d_dir() -> Path:
    env = os.environ.get("TAEMI_CREMA_D")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/crema-d-sample"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("taemi-cache")


@pytest.fixture(scope="module")
def int8(cache) -> dinov2.DinoV2ImageEncoder:
    return dinov2.DinoV2ImageEncoder(precision="int8", cache_dir=cache)


@pytest.fixture(scope="module")
def face_crops() -> list[np.ndarray]:
    """Face crops (224, 224, 3) uint8 of three frames of a real CREMA-D clip."""
    from taemi.extract.face import FaceCropper
    from taemi.extract.media import decode_video

    clip = _crema_d_dir() / "media" / "1001_DFA_ANG_XX.flv"
    if not clip.is_file():
        pytest.skip(f"CREMA-D sample clip {clip} absent (set TAEMI_CREMA_D to the sample folder)")
    video = decode_video(clip, max_frames=60)
    cropper = FaceCropper()
    crops = [c for c in map(cropper.crop_frame, video.frames[::20]) if c is not None]
    assert len(crops) == 3
    return crops


@pytest.mark.realmedia
def test_int8_features_close_to_fp32_on_real_faces(int8, face_crops):
    exact = dinov2.DinoV2ImageEncoder().encode(face_crops)  # (3, 384)
    fast = int8.encode(face_crops)
    assert fast.shape == exact.shape == (3, 384) and fast.dtype == np.float32
    cos = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
    assert cos.min() > 0.98, cos
    assert not np.array_equal(exact, fast)  # really another model


def test_precision_is_in_the_settings(int8):
    fp32 = dinov2.DinoV2ImageEncoder()
    # the exact path's settings are those of every store made before int8 existed
    assert "precision" not in fp32.settings and fp32.precision == "fp32"
    assert int8.settings["precision"] == "int8" and int8.precision == "int8"
    assert int8.settings["quantization"] == dinov2.INT8_RECIPE
    assert len(int8.settings["int8_sha256"]) == 16
    same = {k: v for k, v in int8.settings.items() if k not in ("precision", "quantization")}
    assert same == {**fp32.settings, "int8_sha256": int8.settings["int8_sha256"]}
    assert int8.name == fp32.name  # the same model; the settings tell the precision


def test_int8_model_is_cached_and_rebuilt_when_damaged(int8, cache, caplog):
    (model,) = cache.glob("dinov2-vits14-*-int8-ort*.onnx")
    (digest,) = cache.glob("dinov2-vits14-*-int8-ort*.sha256")
    assert digest.read_text().strip().startswith(int8.settings["int8_sha256"])
    stamp = model.stat().st_mtime_ns
    # as a fresh process: the fp32 graph is not parsed again (its cut is inside the cached
    # model); the input and output shapes come from the session, the features are the same
    dinov2._TOKENS_MODEL_CACHE.clear()
    cut = dinov2._tokens_model
    dinov2._tokens_model = lambda *a: pytest.fail("the fp32 graph was parsed again")
    try:
        again = dinov2.DinoV2ImageEncoder(precision="int8", cache_dir=cache)
    finally:
        dinov2._tokens_model = cut
    assert model.stat().st_mtime_ns == stamp  # read from the cache, not quantised again
    assert again.settings == int8.settings
    assert (again.input_name, again.input_size, again.dim, again.batch_size) == (
        int8.input_name,
        int8.input_size,
        int8.dim,
        int8.batch_size,
    )
    images = [np.random.default_rng(0).integers(0, 256, (80, 60, 3), dtype=np.uint8)] * 2
    np.testing.assert_array_equal(again.encode(images), int8.encode(images))

    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])  # a truncated file
    with caplog.at_level("WARNING", logger="taemi.backbones.dinov2"):
        rebuilt = dinov2.DinoV2ImageEncoder(precision="int8", cache_dir=cache)
    assert "damaged" in caplog.text
    assert model.read_bytes() == data  # rebuilt, byte for byte the same model
    assert rebuilt.settings == int8.settings
    assert sorted(p.name for p in cache.iterdir()) == sorted([model.name, digest.name])


def test_invalid_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"image precision must be one of .*got 'fp16'"):
        dinov2.DinoV2ImageEncoder(precision="fp16", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="CPU only"):
        dinov2.DinoV2ImageEncoder(precision="int8", device="cuda", cache_dir=tmp_path)
    from taemi.backbones.profiles import load_models

    with pytest.raises(ValueError, match="image precision must be 'fp32' or 'int8', got 'bf16'"):
        load_models("offline", image_precision="bf16")
    with pytest.raises(ValueError, match="offline profile's DINOv2 only"):
        load_models("paper", image_precision="int8")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_unwritable_cache_is_a_model_load_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelLoadError, match="could not write the int8 model"):
        dinov2.DinoV2ImageEncoder(precision="int8", cache_dir=blocker / "cache")


def test_cli_image_precision_flag():
    from taemi.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["extract", "--input", "in", "--out", "store", "--image-precision", "int8"]
    )
    assert args.image_precision == "int8"
    assert (
        parser.parse_args(["extract", "--input", "in", "--out", "store"]).image_precision == "fp32"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["extract", "--input", "in", "--out", "store", "--image-precision", "fp16"]
        )


# --------------------------------------------------------------------------- taemi predict


def _features(**vision) -> dict:
    """features.json of a run whose store ``taemi extract`` made (offline profile)."""
    common = {"profile": "offline", "device": "cpu"}
    return {
        "modalities": {
            "audio": {
                "backbone": "whisper",
                "settings": {**common, "max_seconds": 6.0, "sample_rate": 16000},
            },
            "vision": {
                "backbone": "dino",
                "settings": {**common, "max_frames": 8, "frame_policy": "first", "face": None}
                | vision,
            },
            "text": {
                "backbone": "minilm",
                "settings": {**common, "asr": "whisper", "asr_settings": {}, "token_states": False},
            },
        }
    }


def _encoders(**image_settings):
    from taemi.extract.pipeline import Encoders

    def enc(name: str, **settings) -> SimpleNamespace:
        return SimpleNamespace(
            name=name, settings={"profile": "offline", "device": "cpu", **settings}, dim=384
        )

    return Encoders(
        asr=SimpleNamespace(name="whisper", settings={}),
        audio=enc("whisper"),
        image=enc("dino", **image_settings),
        text=enc("minilm"),
        face=None,
        profile="offline",
    )


def test_predict_loads_and_checks_the_runs_precision(monkeypatch):
    from taemi import predict_media
    from taemi.extract import profiles
    from taemi.extract.pipeline import ExtractOptions

    assert predict_media.image_precision(_features()["modalities"]["vision"]["settings"]) == "fp32"
    settings = _features(precision="int8")["modalities"]["vision"]["settings"]
    assert predict_media.image_precision(settings) == "int8"

    calls = []
    monkeypatch.setattr(profiles, "load_encoders", lambda *a, **kw: calls.append(kw) or kw)
    monkeypatch.setattr(predict_media, "_ENCODERS", {})
    predict_media.load_encoders_once("offline", face=False, image_precision="int8")
    predict_media.load_encoders_once("offline", face=False)
    assert [c["image_precision"] for c in calls] == ["int8", "fp32"]  # one cache entry each

    opts = ExtractOptions(max_audio_seconds=6.0, max_frames=8, frame_policy="first")
    run = _features(precision="int8")
    assert predict_media.check_provenance(run, _encoders(precision="int8"), opts) == []
    with pytest.raises(ValueError, match=r"in int8 .*runs in fp32"):
        predict_media.check_provenance(run, _encoders(), opts)
    with pytest.raises(ValueError, match=r"in fp32 .*runs in int8"):
        predict_media.check_provenance(_features(), _encoders(precision="int8"), opts)


def test_predict_keeps_the_callers_model_precision_for_an_int8_run(monkeypatch, tmp_path):
    """The run's image-encoder precision (int8) selects the encoder; the fusion model's
    autocast precision stays the caller's (the two were once the same variable)."""
    from taemi import predict_media, runtime

    class Stop(Exception):
        pass

    seen = []

    def resolve(precision, device):
        seen.append(precision)
        raise Stop

    run = SimpleNamespace(cfg=SimpleNamespace(mode="frozen"))
    monkeypatch.setattr(predict_media, "load_run_once", lambda *a, **kw: run)
    monkeypatch.setattr(
        predict_media, "load_features_record", lambda r: _features(precision="int8")
    )
    monkeypatch.setattr(runtime, "resolve_precision", resolve)
    video = tmp_path / "a.mp4"
    video.write_bytes(b"")
    with pytest.raises(Stop):
        predict_media.predict_media("RUN", [video], device="cpu", precision="bf16")
    assert seen == ["bf16"]


@pytest.mark.slow
@pytest.mark.realmedia
def test_extract_int8_records_the_precision_and_refuses_mixing(
    tmp_path, monkeypatch, cache, int8, capsys
):
    """``taemi extract --image-precision int8`` writes the precision into the store's vision
    settings, and the store then refuses fp32 features."""
    from taemi.cli.main import main

    clip = _crema_d_dir() / "media" / "1001_DFA_ANG_XX.flv"
    if not clip.is_file():
        pytest.skip(f"CREMA-D sample clip {clip} absent (set TAEMI_CREMA_D to the sample folder)")
    monkeypatch.setenv("TAEMI_CACHE", str(cache))  # the int8 model quantised by the fixtures
    store = tmp_path / "store"
    common = [
        "extract",
        "--input",
        str(clip),
        "--out",
        str(store),
        "--max-frames",
        "4",
        "--no-progress",
    ]
    assert main([*common, "--image-precision", "int8"]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["modalities"]["vision"]["settings"]["precision"] == "int8"
    capsys.readouterr()
    assert main([*common, "--force"]) == 2  # fp32 features into the int8 store
    assert "must not be mixed" in capsys.readouterr().err
