"""taemi.store.waveforms: the decoded-audio cache beside a feature store."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from taemi.store import StoreError, StoreWriter, format_info, store_info, verify_store
from taemi.store.clip import ClipFeatures
from taemi.store.waveforms import (
    SCALE,
    WAVEFORMS,
    WaveformCache,
    WaveformCacheError,
    WaveformNotCached,
)

#: Worst round-trip error of the int16 quantisation (plus float32 rounding).
QUANT = 0.5 / SCALE + 1e-7


def noise(n: int, seed: int = 0, peak: float = 0.9) -> np.ndarray:
    return (peak * np.random.default_rng(seed).uniform(-1, 1, n)).astype(np.float32)  # (n,)


@pytest.fixture
def cache(tmp_path: Path) -> WaveformCache:
    """An empty cache (12 s at 16 kHz) in the folder tmp_path/store."""
    (tmp_path / "store").mkdir()
    return WaveformCache(tmp_path / "store", create=True)


def test_round_trip_within_int16_quantisation(cache: WaveformCache) -> None:
    x = noise(16000 * 3)
    x[:4] = [1.0, -1.0, 0.0, 0.5]
    assert cache.put("a", x) == 0
    y = cache.get("a")
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.writeable
    assert np.abs(y - x).max() <= QUANT
    assert y[:3].tolist() == [1.0, -1.0, 0.0]
    assert cache.length("a") == x.shape[0]
    assert "a" in cache and len(cache) == 1 and cache.ids() == ["a"]
    on_disk = np.load(cache.dir / "a.npy")
    assert on_disk.dtype == np.dtype("<i2") and on_disk.shape == x.shape
    manifest = json.loads((cache.dir / "manifest.json").read_text())
    assert manifest == {
        "format": "taemi-waveform-cache",
        "version": 1,
        "sample_rate": 16000,
        "max_seconds": 12.0,
        "dtype": "int16",
        "scale": SCALE,
    }


def test_put_replaces_and_a_reopened_cache_sees_the_files(cache: WaveformCache) -> None:
    cache.put("b", noise(100, seed=1))
    cache.put("a", noise(200, seed=2))
    cache.put("a", noise(300, seed=3))  # replaced
    again = WaveformCache(cache.store)
    assert again.ids() == ["a", "b"] and len(again) == 2
    assert again.length("a") == 300
    np.testing.assert_allclose(again.get("a"), noise(300, seed=3), atol=QUANT)
    assert again.max_samples == 12 * 16000 and again.verify() == []


def test_loud_samples_are_clipped_with_a_warning(cache: WaveformCache, caplog) -> None:
    x = np.array([0.5, 1.5, -2.0, 1.0], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="taemi.store.waveforms"):
        assert cache.put("loud", x) == 2
    assert "2 of 4 samples outside [-1, 1]" in caplog.text and "'loud'" in caplog.text
    np.testing.assert_allclose(cache.get("loud"), [0.5, 1.0, -1.0, 1.0], atol=QUANT)


@pytest.mark.parametrize(
    ("waveform", "message"),
    [
        (np.zeros(0, np.float32), "is empty"),
        (np.zeros((2, 10), np.float32), r"shape \(2, 10\)"),
        (np.zeros(10, np.int16), "dtype int16"),
        (np.array([0.1, np.nan, np.inf], np.float32), "2 NaN/Inf"),
        (np.zeros(12 * 16000 + 1, np.float32), "more than 192000"),
    ],
)
def test_put_rejects_bad_waveforms(cache: WaveformCache, waveform, message) -> None:
    with pytest.raises(ValueError, match=message):
        cache.put("c", waveform)
    assert "c" not in cache and not list(cache.dir.glob("c.*"))


@pytest.mark.parametrize("clip_id", ["../x", "a/b", ".hidden", ""])
def test_put_rejects_unsafe_clip_ids(cache: WaveformCache, clip_id: str) -> None:
    with pytest.raises(ValueError, match="clip id"):
        cache.put(clip_id, noise(10))


def test_float64_input_is_accepted(cache: WaveformCache) -> None:
    x = np.linspace(-1, 1, 101)  # float64
    cache.put("f64", x)
    assert np.abs(cache.get("f64") - x).max() <= QUANT


# ------------------------------------------------------------------ atomic writes, leftovers


def test_a_leftover_tmp_file_does_not_count(cache: WaveformCache) -> None:
    cache.put("a", noise(50))
    (cache.dir / "b.npy.123.tmp").write_bytes(b"half a file")
    opened = WaveformCache(cache.store)
    assert opened.ids() == ["a"] and "b" not in opened and opened.verify() == []
    # a fresh tmp may belong to a writer still running: left alone even by a writer
    WaveformCache(cache.store, create=True)
    assert (cache.dir / "b.npy.123.tmp").exists()


def test_a_writer_removes_stale_tmp_files(cache: WaveformCache, caplog) -> None:
    stale = cache.dir / "b.npy.123.tmp"
    stale.write_bytes(b"half a file")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    WaveformCache(cache.store)  # a reader leaves it
    assert stale.exists()
    with caplog.at_level(logging.WARNING, logger="taemi.store.waveforms"):
        WaveformCache(cache.store, create=True)
    assert not stale.exists() and "interrupted writer" in caplog.text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_tmp(cache, monkeypatch) -> None:
    cache.put("a", noise(50, seed=1))

    def broken_save(fh, arr, allow_pickle=False):
        fh.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cache.put("a", noise(60, seed=2))
    with pytest.raises(OSError):
        cache.put("new", noise(60, seed=2))
    monkeypatch.undo()
    assert sorted(p.name for p in cache.dir.iterdir()) == ["a.npy", "manifest.json"]
    np.testing.assert_allclose(cache.get("a"), noise(50, seed=1), atol=QUANT)
    assert "new" not in cache


# ------------------------------------------------------------------ pickling


def test_pickles_cheaply_and_reads_in_the_copy(cache: WaveformCache) -> None:
    for i in range(20):
        cache.put(f"clip{i:03d}", noise(16000 * 12, seed=i))
    blob = pickle.dumps(cache)
    assert len(blob) < 2000  # root, settings and ids: no audio
    clone = pickle.loads(blob)
    assert clone.ids() == cache.ids()
    np.testing.assert_array_equal(clone.get("clip007"), cache.get("clip007"))


# ------------------------------------------------------------------ errors on opening / reading


def test_missing_clip_error_says_how_to_fix_it(cache: WaveformCache) -> None:
    cache.put("a", noise(10))
    with pytest.raises(WaveformNotCached) as info:
        cache.get("zz")
    msg = str(info.value)
    assert "'zz'" in msg and str(cache.dir) in msg
    assert f"taemi extract --input MEDIA --out {cache.store} --waveforms" in msg
    assert "missing flag" in msg  # a clip without audio has none, by design
    assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)
    with pytest.raises(WaveformNotCached):
        cache.length("zz")


def test_opening_a_store_without_a_cache(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    with pytest.raises(WaveformCacheError, match="no waveform cache .* --waveforms"):
        WaveformCache(tmp_path / "store")
    with pytest.raises(WaveformCacheError, match="not an existing folder"):
        WaveformCache(tmp_path / "nowhere", create=True)
    assert not (tmp_path / "nowhere").exists()


def test_manifest_mismatch_is_an_error(cache: WaveformCache) -> None:
    cache.put("a", noise(10))
    with pytest.raises(WaveformCacheError) as info:
        WaveformCache(cache.store, max_seconds=10.0)
    msg = str(info.value)
    assert "12.0 s per clip at 16000 Hz" in msg and "10.0 s at 16000 Hz" in msg
    assert "manifest.json" in msg
    with pytest.raises(WaveformCacheError, match="at 8000 Hz was asked"):
        WaveformCache(cache.store, create=True, sample_rate=8000)
    assert WaveformCache(cache.store, max_seconds=None).max_seconds == 12.0  # takes the cache's
    with pytest.raises(ValueError, match="needs max_seconds"):
        WaveformCache(cache.store, create=True, max_seconds=None)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"version": 2}, "version 2 is not supported"),
        ({"format": "other"}, "not a taemi waveform cache"),
        ({"dtype": "float16"}, "dtype 'float16'"),
        ({"sample_rate": "16k"}, "sample_rate '16k'"),
    ],
)
def test_bad_manifest_is_an_error(cache: WaveformCache, edit: dict, message: str) -> None:
    path = cache.dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(WaveformCacheError, match=message):
        WaveformCache(cache.store, max_seconds=None)


def test_verify_finds_damaged_files_and_get_names_them(cache: WaveformCache) -> None:
    for name in ("good", "cut", "floats", "long"):
        cache.put(name, noise(1000))
    cut = cache.dir / "cut.npy"
    cut.write_bytes(cut.read_bytes()[:-100])  # truncated copy
    np.save(cache.dir / "floats.npy", np.zeros(10, np.float32))  # wrong dtype
    np.save(cache.dir / "long.npy", np.zeros(12 * 16000 + 5, np.int16))  # too long
    (cache.dir / "junk.npy").write_bytes(b"not numpy")  # unreadable
    opened = WaveformCache(cache.store)
    problems = opened.verify()
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert (
        "cut.npy: 2028 bytes, but its header says 1000 int16 samples (2128 bytes): truncated"
        in text
    )
    assert "floats.npy: holds a float32 array" in text
    assert "long.npy: 192005 samples, more than the cache's 192000" in text
    assert "junk.npy: unreadable waveform file" in text
    with pytest.raises(WaveformCacheError, match=r"cut\.npy: unreadable .*delete the file"):
        opened.get("cut")
    with pytest.raises(WaveformCacheError, match=r"floats\.npy: holds a float32"):
        opened.get("floats")
    with pytest.raises(WaveformCacheError, match=r"junk\.npy"):
        opened.length("junk")
    assert opened.get("good").shape == (1000,)


def test_discard(cache: WaveformCache) -> None:
    cache.put("a", noise(10))
    cache.discard("a")
    cache.discard("never-there")
    assert "a" not in cache and not (cache.dir / "a.npy").exists()


# ------------------------------------------------------------------ store info / verify


def small_store(root: Path, ids: list[str]) -> None:
    dims = {"audio": 3, "vision": 2, "text": 2}
    with StoreWriter(root, dims=dims) as w:
        for i, cid in enumerate(ids):
            w.add(
                ClipFeatures(
                    cid,
                    np.full((4, 3), i, np.float32),
                    np.ones((2, 2), np.float32),
                    np.ones(2, np.float32),
                )
            )


def test_store_info_and_verify_report_the_cache(tmp_path: Path) -> None:
    root = tmp_path / "store"
    small_store(root, ["a", "b"])
    assert store_info(root)["waveforms"] is None
    assert "waveforms" not in format_info(store_info(root))
    cache = WaveformCache(root, create=True)
    cache.put("a", noise(16000 * 12))
    cache.put("b", noise(16000 * 6))
    info = store_info(root)
    assert info["waveforms"]["n_clips"] == 2
    assert info["waveforms"]["seconds"] == pytest.approx(18.0)
    assert info["waveforms"]["bytes"] == sum(p.stat().st_size for p in cache.dir.glob("*.npy"))
    json.dumps(info)
    assert "waveforms    2 clips, 0.01 h of 16 kHz audio (<= 12 s each), 576.3 KB" in format_info(
        info
    )
    assert verify_store(root) == []
    cut = cache.dir / "b.npy"
    cut.write_bytes(cut.read_bytes()[:1000])
    (problem,) = verify_store(root)
    assert "b.npy" in problem and "truncated" in problem
    (cache.dir / "manifest.json").write_text("{")
    assert "cannot read the cache manifest" in store_info(root)["waveforms"]["error"]
    assert "waveforms    unreadable" in format_info(store_info(root))
    assert any("cannot read the cache manifest" in p for p in verify_store(root))
    assert WAVEFORMS == "waveforms"
