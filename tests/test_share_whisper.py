"""``share_whisper`` (``taemi extract --share-whisper``): one Whisper encoder pass per clip
for the transcript and the audio features, on real CREMA-D clips with the offline profile."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main

from taemi.extract.pipeline import ExtractOptions, Source, extract
from taemi.predict_media import extraction_plan
from taemi.store import FeatureStore

SENTENCE_WORDS = {"don't", "forget"}  # every clip of the sample says "Don't forget a jacket."
NEEDED = ("av", "faster_whisper", "ctranslate2", "onnxruntime", "transformers")


def _sample() -> Path:
    env = os.environ.get("TAEMI_CREMA_D")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/crema-d-sample"
    return root / "media"


@pytest.fixture(scope="module")
def encoders():
    if not _sample().is_dir() or any(importlib.util.find_spec(m) is None for m in NEEDED):
        pytest.skip("needs the CREMA-D sample and the offline profile's packages")
    from taemi.extract.profiles import load_encoders

    return load_encoders("offline", face=False)


@pytest.mark.realmedia
@pytest.mark.slow
def test_shared_pass_keeps_the_audio_features_and_runs_one_pass(encoders, tmp_path) -> None:
    from taemi.backbones.whisper import _first_window

    files = sorted(_sample().iterdir())[:2] + sorted(_sample().iterdir())[-2:]  # FLV and MP3
    sources = [Source(f.stem, f) for f in files]
    exact = extract(sources, tmp_path / "exact", encoders, ExtractOptions(), progress=False)
    tap = _first_window(encoders.asr.whisper.model)
    passes = tap.own_passes
    shared = extract(
        sources,
        tmp_path / "shared",
        encoders,
        ExtractOptions(share_whisper=True),
        progress=False,
    )
    assert exact.ok and shared.ok and shared.done == len(files)
    assert tap.own_passes == passes  # every transcript decoded from the features' pass
    a, b = FeatureStore(tmp_path / "exact"), FeatureStore(tmp_path / "shared")
    for f in files:
        assert np.array_equal(a.get(f.stem).audio, b.get(f.stem).audio)  # bit for bit
        text = (tmp_path / "shared" / "transcripts" / f"{f.stem}.txt").read_text().lower()
        assert SENTENCE_WORDS <= set(text.replace(".", " ").replace("!", " ").split())
    prov_a, prov_b = a.manifest["modalities"], b.manifest["modalities"]
    assert prov_a["audio"] == prov_b["audio"]
    assert prov_b["text"]["settings"]["share_whisper"] is True
    assert "share_whisper" not in prov_a["text"]["settings"]  # the exact path's record

    # taemi predict --run extracts the way the run's features were made
    record = {"modalities": prov_b}
    _, opts, _ = extraction_plan(record, None)
    assert opts.share_whisper is True
    assert extraction_plan({"modalities": prov_a}, None)[1].share_whisper is False


@pytest.mark.realmedia
@pytest.mark.slow
def test_share_whisper_needs_one_whisper_model_in_both_roles(encoders, tmp_path) -> None:
    class OtherRecognizer:
        name, settings = "other-asr", {}

        def transcribe(self, waveform, encoder_states=None) -> str:
            return "hello"

    mixed = dataclasses.replace(encoders, asr=OtherRecognizer())
    with pytest.raises(ValueError, match="needs one Whisper model that both transcribes"):
        extract([], tmp_path / "s", mixed, ExtractOptions(share_whisper=True), progress=False)
    assert not (tmp_path / "s").exists()  # refused before the store was opened


def test_share_whisper_with_the_paper_profile_is_refused_before_any_model_loads(
    tmp_path, capsys, monkeypatch
) -> None:
    import taemi.extract.profiles

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(taemi.extract.profiles, "load_encoders", no_load)
    media = tmp_path / "in"
    media.mkdir()
    argv = ["extract", "--input", str(media), "--out", str(tmp_path / "s"), "--profile", "paper"]
    code, _ = run_main([*argv, "--share-whisper"])
    assert code == 2 and "--share-whisper needs one Whisper model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="share_whisper must be true or false"):
        ExtractOptions(share_whisper="yes")  # type: ignore[arg-type]


@pytest.mark.realmedia
@pytest.mark.slow
def test_shared_pass_of_digital_silence_is_not_decoded(encoders) -> None:
    """Decoding the shared pass of digital silence hallucinates "you"; the exact path finds
    no speech there, and so does the shared path now (no decoding at all)."""
    silence = np.zeros(48000, np.float32)
    (window,) = encoders.audio.encode_windows([silence])
    assert encoders.asr.transcribe(silence) == ""
    assert encoders.asr.transcribe(silence, encoder_states=window) == ""
    noise = (1e-3 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32)
    (window,) = encoders.audio.encode_windows([noise])  # faint noise is decoded: no speech
    assert encoders.asr.transcribe(noise, encoder_states=window) == ""
