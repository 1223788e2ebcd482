"""``taemi extract --waveforms``: the decoded-audio cache written during extraction.

Uses the fast fake encoders and media generators of ``tests/test_extract.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av", reason="PyAV is not installed (media extra)")

from test_extract import (
    calls,
    cli_fakes,  # noqa: F401 (fixture)
    colour_frames,
    error_lines,
    fake_encoders,
    good_corpus,
    run,
    shard_names,
    write_clip,
)

from taemi.cli.main import main
from taemi.extract import pipeline
from taemi.extract.media import decode_audio
from taemi.extract.pipeline import SUMMARY_FILE, TRANSCRIPTS
from taemi.store import FeatureStore, verify_store
from taemi.store.waveforms import SCALE, WaveformCache

QUANT = 0.5 / SCALE + 1e-7
WITH_AUDIO = ["av", "c330", "c440", "c550", "long"]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good_corpus (c330/c440/c550.wav, av.mp4), a 13 s tone (long.wav, cropped to 12 s),
    a video-only clip and a corrupt file."""
    root = good_corpus(tmp_path_factory.mktemp("wave") / "media")
    write_clip(root / "long.wav", hz=770, seconds=13.0, rate=16000)
    write_clip(root / "video_only.mp4", hz=None, frames=colour_frames(6))
    (root / "garbage.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    )
    return root


def tree(store: Path) -> dict[str, int]:
    """Features, index, manifest and transcripts (not the cache, not the run reports): name -> mtime."""
    reports = ("extract_summary.json", "extract_errors.jsonl", ".lock")
    return {
        str(p.relative_to(store)): p.stat().st_mtime_ns
        for p in sorted(store.rglob("*"))
        if p.is_file() and "waveforms" not in p.parts and p.name not in reports
    }


def test_extract_caches_the_decoded_audio_of_clips_with_audio(media: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    s = run(media, store, waveforms=True, batch_size=2)
    assert (s.done, s.failed) == (6, 1)  # garbage.mp4 fails, the run goes on
    assert (s.waveforms, s.waveforms_added, s.waveforms_failed) == (5, 0, 0)
    assert s.ok
    (err,) = error_lines(store)
    assert (err["clip_id"], err["stage"]) == ("garbage", "decode")
    cache = WaveformCache(store)
    assert cache.ids() == WITH_AUDIO  # none for video_only, none for the corrupt file
    assert sorted(p.name for p in (store / "waveforms").iterdir()) == sorted(
        [f"{c}.npy" for c in WITH_AUDIO] + ["manifest.json"]
    )
    for clip_id in WITH_AUDIO:
        path = next(media.glob(f"{clip_id}.*"))
        expected = decode_audio(path, sample_rate=16000, max_seconds=12.0).samples  # (S,)
        got = cache.get(clip_id)
        assert got.shape == expected.shape
        assert np.abs(got - np.clip(expected, -1, 1)).max() <= QUANT
    assert cache.length("long") == 12 * 16000  # the first 12 s only
    fs = FeatureStore(store)
    assert fs.missing[fs.index("video_only"), 0]  # the store says the audio is missing
    summary = json.loads((store / SUMMARY_FILE).read_text())
    assert summary["waveforms"] == 5 and summary["waveforms_failed"] == 0
    assert verify_store(store) == []
    # the provenance does not record the cache: a store with or without it is the same store
    assert "waveforms" not in json.dumps(
        json.loads((store / "manifest.json").read_text())["modalities"]
    )


def test_rerun_adds_waveforms_without_encoding_again(
    media: Path, tmp_path: Path, monkeypatch
) -> None:
    store = tmp_path / "store"
    first = run(media, store)
    assert first.done == 6 and not (store / "waveforms").exists()
    shards, before = shard_names(store), tree(store)

    enc = fake_encoders()
    s = run(media, store, enc, waveforms=True)
    assert calls(enc) == {"asr": 0, "audio": 0, "image": 0, "text": 0}
    assert (s.done, s.skipped, s.failed) == (0, 6, 1)
    assert (s.waveforms, s.waveforms_added, s.waveforms_failed) == (5, 5, 0)
    assert shard_names(store) == shards and tree(store) == before  # the store is untouched
    assert WaveformCache(store).ids() == WITH_AUDIO
    assert verify_store(store) == []

    decoded: list[str] = []
    real = pipeline.decode_waveform

    def counting(src, opts, face=None):
        decoded.append(src.clip_id)
        return real(src, opts, face)

    monkeypatch.setattr(pipeline, "decode_waveform", counting)
    enc = fake_encoders()
    s = run(media, store, enc, waveforms=True)  # everything cached: nothing to do
    assert decoded == [] and calls(enc) == {"asr": 0, "audio": 0, "image": 0, "text": 0}
    assert (s.skipped, s.waveforms, s.waveforms_added) == (6, 0, 0)

    (store / "waveforms" / "c440.npy").unlink()  # one lost: only that one is decoded again
    s = run(media, store, fake_encoders(), waveforms=True)
    assert decoded == ["c440"] and s.waveforms_added == 1
    assert tree(store) == before


def test_a_clip_whose_waveform_fails_is_reported_and_the_run_goes_on(
    tmp_path: Path, monkeypatch
) -> None:
    media = good_corpus(tmp_path / "media")
    store = tmp_path / "store"
    run(media, store)
    (media / "c330.wav").write_bytes(b"RIFF broken")  # its features are in the store already
    real_put = WaveformCache.put

    def put(self, clip_id, waveform):
        if clip_id == "c550":
            raise OSError("No space left on device")
        return real_put(self, clip_id, waveform)

    monkeypatch.setattr(WaveformCache, "put", put)
    s = run(media, store, waveforms=True)
    assert (s.done, s.skipped, s.failed) == (0, 4, 0)
    assert (s.waveforms, s.waveforms_added, s.waveforms_failed) == (2, 2, 2)
    assert s.ok
    errs = {e["clip_id"]: e for e in error_lines(store)}
    assert set(errs) == {"c330", "c550"} and {e["stage"] for e in errs.values()} == {"waveform"}
    assert "c330.wav" in errs["c330"]["reason"]
    assert errs["c550"]["reason"] == "OSError: No space left on device"
    assert WaveformCache(store).ids() == ["av", "c440"]
    assert verify_store(store) == []


def test_a_waveform_failure_during_extraction_keeps_the_features(
    tmp_path: Path, monkeypatch
) -> None:
    media = good_corpus(tmp_path / "media")
    store = tmp_path / "store"

    def put(self, clip_id, waveform):
        raise OSError("read-only file system")

    monkeypatch.setattr(WaveformCache, "put", put)
    s = run(media, store, waveforms=True)
    assert (s.done, s.failed, s.waveforms, s.waveforms_failed) == (4, 0, 0, 4)
    assert not s.ok  # every waveform failed: something is wrong with the cache
    assert len(FeatureStore(store)) == 4 and (store / TRANSCRIPTS / "c440.txt").exists()
    assert [e["stage"] for e in error_lines(store)] == ["waveform"] * 4


def test_force_rewrites_the_cache(tmp_path: Path) -> None:
    media = good_corpus(tmp_path / "media", hz=(440,))
    store = tmp_path / "store"
    run(media, store, waveforms=True)
    first = WaveformCache(store).get("c440")
    s = run(media, store, waveforms=True, force=True)
    assert (s.done, s.waveforms, s.waveforms_added) == (2, 2, 0)
    np.testing.assert_array_equal(WaveformCache(store).get("c440"), first)


def test_cli_extract_waveforms_and_store_info(
    media: Path,
    tmp_path: Path,
    cli_fakes,  # noqa: F811 (the imported fixture)
    capsys,
) -> None:
    store = tmp_path / "store"
    code = main(
        ["extract", "--input", str(media), "--out", str(store), "--no-progress", "--waveforms"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "6 done, 0 skipped, 1 failed" in out
    assert "waveforms cached: 5 (0 for clips already in the store), 0 failed" in out
    assert main(["store", "info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "waveforms    5 clips" in out and "16 kHz audio (<= 12 s each)" in out
    assert main(["store", "verify", str(store)]) == 0
