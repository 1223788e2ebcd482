"""Where the extraction encoders run (issue 15 item 6): ``device="auto"`` and fp16 encoders.

The GPU itself is exercised by ``benchmarks/gpu_check.sh`` (step ``encoders``); here the
decisions are checked on the CPU with the libraries' answers replaced.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest

from taemi.backbones import profiles


def fake_libraries(monkeypatch, *, torch_cuda: bool, ct2_devices: int, ort_providers: list[str]):
    monkeypatch.setattr("torch.cuda.is_available", lambda: torch_cuda)
    ct2 = types.SimpleNamespace(get_cuda_device_count=lambda: ct2_devices)
    ort = types.SimpleNamespace(get_available_providers=lambda: ort_providers)
    monkeypatch.setitem(sys.modules, "ctranslate2", ct2)
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch, caplog) -> None:
    fake_libraries(
        monkeypatch, torch_cuda=False, ct2_devices=0, ort_providers=["CPUExecutionProvider"]
    )
    with caplog.at_level(logging.INFO, logger="taemi.backbones.profiles"):
        assert profiles.encoder_device("auto", "offline") == "cpu"
    assert "torch sees no CUDA device" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_takes_the_gpu_when_every_library_can(monkeypatch) -> None:
    fake_libraries(
        monkeypatch,
        torch_cuda=True,
        ct2_devices=1,
        ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert profiles.encoder_device("auto", "offline") == "cuda"
    assert profiles.encoder_device("auto", "paper") == "cuda"


def test_auto_names_the_library_that_cannot_use_the_gpu(monkeypatch, caplog) -> None:
    fake_libraries(
        monkeypatch, torch_cuda=True, ct2_devices=1, ort_providers=["CPUExecutionProvider"]
    )
    with caplog.at_level(logging.INFO, logger="taemi.backbones.profiles"):
        assert profiles.encoder_device("auto", "offline") == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "onnxruntime-gpu" in warnings[0]
    # the paper profile has no ONNX model: onnxruntime's providers do not matter to it
    assert profiles.encoder_device("auto", "paper") == "cuda"
    fake_libraries(
        monkeypatch,
        torch_cuda=True,
        ct2_devices=0,
        ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert profiles.gpu_blockers("paper") == [
        "CTranslate2 (Whisper) sees no CUDA device: a CPU-only build"
    ]


def test_explicit_devices_pass_and_others_fail() -> None:
    assert profiles.encoder_device("cpu", "offline") == "cpu"
    assert (
        profiles.encoder_device("cuda", "offline") == "cuda"
    )  # its libraries raise if they cannot
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'cuda'"):
        profiles.encoder_device("tpu", "offline")


def test_fp16_encoders_need_a_gpu_and_fail_before_any_model_loads(monkeypatch) -> None:
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(profiles, "_offline", no_load)
    monkeypatch.setattr(profiles, "_paper", no_load)
    with pytest.raises(ValueError, match="fp16 runs on a GPU only"):
        profiles.load_models("offline", device="cpu", encoder_precision="fp16")
    with pytest.raises(ValueError, match="encoder precision must be one of"):
        profiles.load_models("paper", device="cpu", encoder_precision="int8")
    with pytest.raises(ValueError, match="unknown extraction profile"):
        profiles.load_models("nope", device="auto")


def test_fp16_reaches_every_paper_model(monkeypatch) -> None:
    """fp16 on the GPU: wav2vec2, ViT and GTE get float16, faster-whisper float16."""
    from taemi.backbones import text, vit, wav2vec2, whisper

    seen: dict[str, dict] = {}

    def recorder(name):
        def make(source, **kw):
            seen[name] = kw
            return types.SimpleNamespace(name=name)

        return make

    monkeypatch.setattr(wav2vec2, "Wav2Vec2EmotionEncoder", recorder("audio"))
    monkeypatch.setattr(vit, "ViTImageEncoder", recorder("vision"))
    monkeypatch.setattr(text, "GTETextEncoder", recorder("text"))
    monkeypatch.setattr(whisper, "FasterWhisperRecognizer", recorder("asr"))
    profiles.load_models("paper", device="cuda", encoder_precision="fp16")
    assert {seen[m]["dtype"] for m in ("audio", "vision", "text")} == {"float16"}
    assert seen["asr"]["compute_type"] == "float16"
    assert {seen[m]["device"] for m in seen} == {"cuda"}
    profiles.load_models("paper", device="cpu")
    assert {seen[m]["dtype"] for m in ("audio", "vision", "text")} == {"float32"}
    assert seen["asr"]["compute_type"] == "default"


def test_offline_whisper_compute_type_follows_the_precision(monkeypatch) -> None:
    from taemi.backbones import dinov2, minilm, whisper

    calls: list[dict] = []
    monkeypatch.setattr(whisper, "load_whisper", lambda d, **kw: calls.append(kw) or kw)
    monkeypatch.setattr(whisper, "WhisperRecognizer", lambda loaded: loaded)
    monkeypatch.setattr(whisper, "WhisperEncoder", lambda loaded, **kw: loaded)
    monkeypatch.setattr(dinov2, "DinoV2ImageEncoder", lambda *a, **kw: kw)
    monkeypatch.setattr(minilm, "MiniLMTextEncoder", lambda *a, **kw: kw)
    m = profiles.load_models("offline", device="cuda", encoder_precision="fp16")
    assert calls[-1]["compute_type"] == "float16" and calls[-1]["device"] == "cuda"
    assert m.image["device"] == "cuda" and m.text["device"] == "cuda"
    profiles.load_models("offline", device="cpu")
    assert calls[-1]["compute_type"] == "int8"  # the offline profile's CPU reference
