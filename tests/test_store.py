"""Tests of the feature store (taemi.store): round trips, validation, atomicity, verify."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import taemi.store.reader as reader_mod
import taemi.store.writer as writer_mod
from taemi.store import (
    FORMAT_VERSION,
    FeatureStore,
    StoreError,
    StoreWriter,
    format_info,
    store_info,
    verify_store,
)
from taemi.store.clip import ClipFeatures

_CHILD = Path(__file__).with_name("_store_writer_child.py")
_spec = importlib.util.spec_from_file_location("_store_writer_child", _CHILD)
assert _spec is not None and _spec.loader is not None
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

DIMS = child.DIMS
make_clip = child.make_clip
clip_id = child.clip_id
MODS = ("audio", "vision", "text", "text_tokens")


def assert_clip_equal(got: ClipFeatures, want: ClipFeatures, dtype: str) -> None:
    """``got`` (from the store) equals ``want`` converted to the store dtype; None where missing."""
    assert got.clip_id == want.clip_id
    for m in MODS:
        g, w = getattr(got, m), getattr(want, m)
        if w is None:
            assert g is None, (want.clip_id, m)
        else:
            assert g is not None, (want.clip_id, m)
            assert g.dtype == np.dtype(dtype), (want.clip_id, m, g.dtype)
            np.testing.assert_array_equal(g, w.astype(dtype), err_msg=f"{want.clip_id} {m}")


def write(root: Path, ids: range, *, text_tokens: bool = False, **kw: object) -> None:
    with StoreWriter(root, dims=DIMS, text_tokens=text_tokens, **kw) as w:  # type: ignore[arg-type]
        for i in ids:
            w.add(make_clip(i, text_tokens=text_tokens))


def shard_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "shards").iterdir())


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("text_tokens", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path: Path, dtype: str, text_tokens: bool) -> None:
    root = tmp_path / "store"
    write(root, range(12), text_tokens=text_tokens, dtype=dtype, shard_size=5)
    store = FeatureStore(root)
    assert len(store) == 12
    assert store.ids == [clip_id(i) for i in range(12)]
    assert store.ids[0] == "00000" and isinstance(store.ids[0], str)
    assert store.dtype == np.dtype(dtype) and store.has_text_tokens is text_tokens
    assert store.dims == DIMS
    for i in range(12):
        want = make_clip(i, text_tokens=text_tokens)
        assert_clip_equal(store.get(i), want, dtype)
        assert_clip_equal(store[clip_id(i)], want, dtype)
        assert tuple(store.missing[i]) == want.missing
        assert store.lengths["audio"][i] == (0 if want.audio is None else len(want.audio))
        assert store.lengths["vision"][i] == (0 if want.vision is None else len(want.vision))
        if text_tokens:
            assert store.lengths["text_tokens"][i] == (
                0 if want.text_tokens is None else len(want.text_tokens)
            )
    assert ("text_tokens" in store.lengths) is text_tokens
    assert store.missing.sum(axis=0).tolist() == [2, 2, 3]  # i%5==3, i%7==4, i%4==1 in 0..11
    assert store.index("00007") == 7 and "00007" in store and "99999" not in store
    assert store.get(-1).clip_id == "00011"
    with pytest.raises(KeyError, match="'77777'"):
        store.index("77777")
    with pytest.raises(IndexError):
        store.get(12)
    assert verify_store(root) == []


def test_reader_returns_read_only_memmap_views(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write(root, range(3), text_tokens=True, shard_size=10)
    store = FeatureStore(root)
    c = store.get(0)  # all modalities present for clip 0
    for m in MODS:
        a = getattr(c, m)
        assert isinstance(a, np.memmap), m
        assert a.dtype == np.float16 and not a.flags.writeable, m
    # Two reads of the same clip share memory: views on one map, no copies.
    assert np.shares_memory(store.get(0).audio, c.audio)


def test_empty_store_opens(tmp_path: Path) -> None:
    root = tmp_path / "store"
    StoreWriter(root, dims=DIMS).close()
    store = FeatureStore(root)
    assert len(store) == 0 and store.ids == [] and store.missing.shape == (0, 3)
    assert verify_store(root) == []
    assert store_info(root)["n_clips"] == 0
    assert not (root / ".lock").exists()  # the lock file lives only while a writer is open


def test_writer_needs_dims_to_create_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="pass dims="):
        StoreWriter(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not empty"):
        StoreWriter(tmp_path / "busy", dims=DIMS)
    with pytest.raises(ValueError, match="keys exactly"):
        StoreWriter(tmp_path / "x", dims={"audio": 5, "vision": 4})


# --------------------------------------------------------------------------- shards, append, replace


def test_multiple_shards_append_and_contains(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with StoreWriter(root, dims=DIMS, shard_size=2) as w:
        for i in range(5):
            w.add(make_clip(i))
            assert clip_id(i) in w
        assert w.n_committed == 4 and w.n_pending == 1
        assert "00004" in w and "00005" not in w and 5 not in w  # type: ignore[operator]
    assert shard_dirs(root) == ["00000", "00001", "00002"]
    with StoreWriter(root, shard_size=2) as w:  # reopen: dims etc. come from the manifest
        assert w.n_committed == 5 and "00004" in w
        for i in range(8):
            if clip_id(i) not in w:
                w.add(make_clip(i))
    store = FeatureStore(root)
    assert store.ids == [clip_id(i) for i in range(8)]
    assert len(store.manifest["shards"]) == 5
    for i in range(8):
        assert_clip_equal(store.get(i), make_clip(i), "float16")


def test_replace_supersedes_and_duplicates_raise(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with StoreWriter(root, dims=DIMS, shard_size=3) as w:
        for i in range(4):
            w.add(make_clip(i))
        with pytest.raises(ValueError, match="'00001' is already in the store.*replace=True"):
            w.add(make_clip(1))  # committed
        with pytest.raises(ValueError, match="'00003' is already in the store"):
            w.add(make_clip(3))  # pending
        w.add(make_clip(1, scale=7.0), replace=True)  # committed -> superseded
        w.add(make_clip(3, scale=9.0), replace=True)  # pending -> flushed first, then superseded
        assert w.n_committed == 4
    store = FeatureStore(root)
    # A superseded clip appears once, at its newest position.
    assert store.ids == ["00000", "00002", "00001", "00003"]
    assert_clip_equal(store["00001"], make_clip(1, scale=7.0), "float16")
    assert_clip_equal(store["00003"], make_clip(3, scale=9.0), "float16")
    assert_clip_equal(store["00000"], make_clip(0), "float16")
    info = store_info(root)
    assert info["superseded"] == 2 and info["n_clips"] == 4
    assert verify_store(root) == []
    # No shard holds an id twice.
    for s in store.manifest["shards"]:
        with np.load(root / "shards" / s["name"] / "index.npz", allow_pickle=False) as npz:
            ids = npz["ids"].tolist()
        assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- validation


def _bad(kind: str) -> ClipFeatures:
    good = make_clip(0)  # every modality present
    a, v, t = good.audio, good.vision, good.text
    assert a is not None and v is not None and t is not None
    nan = a.copy()
    nan[0, 1] = np.nan
    inf = v.copy()
    inf[0, 0] = np.inf
    big = a.copy()
    big[0, 0] = 1e6
    cases = {
        "dims": ClipFeatures("c1", a[:, :4], v, t),
        "text_dims": ClipFeatures("c1", a, v, np.zeros(4, np.float32)),
        "nan": ClipFeatures("c1", nan, v, t),
        "inf": ClipFeatures("c1", a, inf, t),
        "overflow": ClipFeatures("c1", big, v, t),
        "zero_rows": ClipFeatures("c1", np.zeros((0, 5), np.float32), v, t),
        "audio_1d": ClipFeatures("c1", a[0], v, t),
        "text_2d": ClipFeatures("c1", a, v, t[None]),
        "tokens_without_store_tokens": ClipFeatures("c1", a, v, t, np.zeros((2, 3), np.float32)),
        "strings": ClipFeatures("c1", np.array([["x"] * 5]), v, t),
    }
    return cases[kind]


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("dims", "audio has shape \\(1, 4\\), expected \\(T, D\\) with D = 5"),
        ("text_dims", "text has shape \\(4,\\)"),
        ("nan", "audio has 1 NaN/Inf"),
        ("inf", "vision has 1 NaN/Inf"),
        ("overflow", "audio has values outside the float16 range"),
        ("zero_rows", "audio has 0 rows; a modality with no data must be None"),
        ("audio_1d", "audio has shape \\(5,\\)"),
        ("text_2d", "text has shape \\(1, 3\\)"),
        ("tokens_without_store_tokens", "text_tokens=False"),
        ("strings", "real numbers"),
    ],
)
def test_add_validation(tmp_path: Path, kind: str, match: str) -> None:
    with StoreWriter(tmp_path / "s", dims=DIMS) as w:
        with pytest.raises(ValueError, match=f"clip 'c1'.*{match}"):
            w.add(_bad(kind))
        assert w.n_pending == 0
    assert len(FeatureStore(tmp_path / "s")) == 0


@pytest.mark.parametrize("bad_id", ["../x", "a/b", ".hidden", "", 42])
def test_add_rejects_bad_ids(tmp_path: Path, bad_id: object) -> None:
    c = make_clip(0)
    match = repr(bad_id).replace(".", "\\.")
    with StoreWriter(tmp_path / "s", dims=DIMS) as w, pytest.raises(ValueError, match=match):
        w.add(ClipFeatures(bad_id, c.audio, c.vision, c.text))  # type: ignore[arg-type]


def test_text_tokens_rules(tmp_path: Path) -> None:
    c = make_clip(0, text_tokens=True)
    with StoreWriter(tmp_path / "s", dims=DIMS, text_tokens=True) as w:
        with pytest.raises(ValueError, match="clip '00000'.*keeps text token states"):
            w.add(ClipFeatures("00000", c.audio, c.vision, c.text, None))
        with pytest.raises(ValueError, match="clip '00000': text is missing but text_tokens"):
            w.add(ClipFeatures("00000", c.audio, c.vision, None, c.text_tokens))
        w.add(ClipFeatures("00000", c.audio, c.vision, None, None))
    assert FeatureStore(tmp_path / "s").get(0).text_tokens is None


def test_float32_store_accepts_large_values_and_rejects_float64_overflow(tmp_path: Path) -> None:
    c = make_clip(0)
    assert c.audio is not None
    big = c.audio.copy()
    big[0, 0] = 1e6
    with StoreWriter(tmp_path / "s", dims=DIMS, dtype="float32") as w:
        w.add(ClipFeatures("ok", big, c.vision, c.text))
        huge = big.astype(np.float64)
        huge[0, 0] = 1e300
        with pytest.raises(ValueError, match="clip 'huge': audio has values outside the float32"):
            w.add(ClipFeatures("huge", huge, c.vision, c.text))
    assert FeatureStore(tmp_path / "s")["ok"].audio[0, 0] == np.float32(1e6)  # type: ignore[index]


# --------------------------------------------------------------------------- manifest checks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dims": {"audio": 6, "vision": 4, "text": 3}}, "dims"),
        ({"dtype": "float32"}, "dtype float16"),
        ({"text_tokens": True}, "text_tokens=False"),
        ({"modalities": {"audio": {"backbone": "other", "settings": {}}}}, "must not be mixed"),
    ],
)
def test_reopen_mismatch_raises(tmp_path: Path, kwargs: dict, match: str) -> None:
    root = tmp_path / "s"
    prov = {"audio": {"backbone": "w2v", "settings": {"seconds": 12}}}
    write(root, range(2), modalities=prov)
    with pytest.raises(StoreError, match=match):
        StoreWriter(root, **kwargs)
    # Matching arguments (tuples normalised like JSON) are fine, and the lock was released.
    StoreWriter(root, dims=DIMS, dtype="float16", text_tokens=False, modalities=prov).close()
    assert FeatureStore(root).manifest["modalities"] == prov


def test_unknown_version_and_bad_manifests(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write(root, range(2))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 7
    (root / "manifest.json").write_text(json.dumps(manifest))
    for opener in (FeatureStore, StoreWriter):
        with pytest.raises(
            StoreError, match=f"version 7 is not supported.*version {FORMAT_VERSION}"
        ):
            opener(root)
    assert "version 7" in verify_store(root)[0]
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot read the manifest"):
        FeatureStore(root)
    with pytest.raises(StoreError, match="manifest.json not found"):
        FeatureStore(tmp_path / "absent")


def test_missing_shard_file_raises(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write(root, range(3))
    (root / "shards" / "00000" / "vision.bin").unlink()
    with pytest.raises(StoreError, match="shard 00000: vision.bin is missing"):
        FeatureStore(root)
    assert any("00000: vision.bin is missing" in p for p in verify_store(root))


def test_failed_write_rolls_back_the_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    real_write = writer_mod._PendingShard._write
    calls = {"n": 0}

    def flaky_write(self: object, name: str, a: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # clip 1: audio.bin written, vision.bin fails
            raise OSError("disk full (simulated)")
        real_write(self, name, a)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_mod._PendingShard, "_write", flaky_write)
    with StoreWriter(root, dims=DIMS, shard_size=10) as w:
        w.add(make_clip(0))  # 3 writes
        with pytest.raises(OSError, match="disk full"):
            w.add(make_clip(2))  # audio ok, then vision fails
        assert "00002" not in w
        w.add(make_clip(4))
    assert FeatureStore(root).ids == ["00000", "00004"]
    assert verify_store(root) == []
    assert_clip_equal(FeatureStore(root)["00004"], make_clip(4), "float16")


def test_reader_bounds_open_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    write(root, range(8), shard_size=1)
    monkeypatch.setattr(reader_mod, "_MAX_OPEN_MAPS", 3)
    store = FeatureStore(root)
    clips = [store.get(i) for i in range(8)]
    assert len(store._maps) == 3
    for i, c in enumerate(clips):  # views stay valid after their map left the cache
        assert_clip_equal(c, make_clip(i), "float16")


# --------------------------------------------------------------------------- lock and atomicity


def test_second_writer_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with StoreWriter(root, dims=DIMS):
        with pytest.raises(StoreError, match="is being written by another process"):
            StoreWriter(root, dims=DIMS)
        FeatureStore(root)  # readers are not blocked
    StoreWriter(root).close()  # released on close


def test_exit_commits_added_clips_when_an_exception_propagates(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with (
        pytest.raises(RuntimeError, match="boom"),
        StoreWriter(root, dims=DIMS, shard_size=100) as w,
    ):
        for i in range(3):
            w.add(make_clip(i))
        raise RuntimeError("boom")
    assert FeatureStore(root).ids == ["00000", "00001", "00002"]
    with pytest.raises(ValueError, match="closed"):
        w.add(make_clip(5))
    w.close()  # idempotent


def test_killed_writer_leaves_a_readable_store_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "s"
    n = 40
    proc = subprocess.Popen(
        [sys.executable, str(_CHILD), str(root), str(n), "2", "0.01"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("committed") and int(line.split()[1]) >= 6:
                break
        else:
            pytest.fail("the writer child ended before committing 6 clips")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    store = FeatureStore(root)
    assert 6 <= len(store) < n
    assert verify_store(root) == []
    for cid in store.ids:
        assert_clip_equal(store[cid], make_clip(int(cid), text_tokens=True), "float16")

    # Resume: a new writer cleans the crashed writer's leftovers and adds only what is missing.
    (root / "shards" / ".tmp-crashed").mkdir(exist_ok=True)
    (root / "shards" / "99999").mkdir()
    out = subprocess.run(
        [sys.executable, str(_CHILD), str(root), str(n), "5", "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip().endswith("done")
    store = FeatureStore(root)
    assert sorted(store.ids) == [clip_id(i) for i in range(n)]
    assert store_info(root)["superseded"] == 0  # no clip written twice
    assert shard_dirs(root) == sorted(s["name"] for s in store.manifest["shards"])
    for cid in store.ids:
        assert_clip_equal(store[cid], make_clip(int(cid), text_tokens=True), "float16")
    assert verify_store(root) == []


def test_crash_between_shard_rename_and_manifest_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "s"
    write(root, range(2), shard_size=2)
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated crash before the manifest is replaced")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", failing_replace)
    w = StoreWriter(root, shard_size=2)
    w.add(make_clip(2))
    with pytest.raises(StoreError, match="committing a shard of 2 clips failed.*simulated crash"):
        w.add(make_clip(3))
    w.close()
    monkeypatch.setattr(os, "replace", real_replace)

    assert shard_dirs(root) == ["00000", "00001"]  # 00001: renamed, never listed
    store = FeatureStore(root)
    assert store.ids == ["00000", "00001"]
    assert verify_store(root) == []
    with (
        caplog.at_level("WARNING", logger="taemi.store.writer"),
        StoreWriter(root, shard_size=2) as w,
    ):
        assert "00002" not in w
        w.add(make_clip(2))
        w.add(make_clip(3))
    assert "00001" in caplog.text and "interrupted writer" in caplog.text
    assert not (root / "manifest.json.tmp").exists()
    store = FeatureStore(root)
    assert store.ids == [clip_id(i) for i in range(4)]
    assert_clip_equal(store["00003"], make_clip(3), "float16")


# --------------------------------------------------------------------------- verify


def _patch_sha(root: Path, shard: str, fname: str) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == shard)["files"][fname]
    entry["sha256"] = hashlib.sha256((root / "shards" / shard / fname).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_verify_catches_flipped_byte(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write(root, range(4), shard_size=2)
    path = root / "shards" / "00001" / "audio.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01  # low mantissa bit of a float16: still finite
    path.write_bytes(bytes(data))
    (problem,) = verify_store(root)  # exactly one problem
    assert "shard 00001" in problem and "audio.bin sha256 mismatch" in problem


def test_verify_catches_nan_with_valid_checksum(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write(root, range(4), shard_size=4)
    store = FeatureStore(root)
    k = store.index("00002")  # audio present, 3 rows, starts after clips 0 and 1
    row = int(store._offset["audio"][k]) + 1
    path = root / "shards" / "00000" / "audio.bin"
    data = bytearray(path.read_bytes())
    pos = (row * DIMS["audio"] + 2) * 2
    data[pos : pos + 2] = np.array([np.nan], dtype="<f2").tobytes()
    path.write_bytes(bytes(data))
    _patch_sha(root, "00000", "audio.bin")
    (problem,) = verify_store(root, progress=True)
    assert "clip '00002' audio has NaN/Inf" in problem and "shard 00000" in problem


def test_verify_catches_truncated_file(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write(root, range(4), shard_size=4)
    path = root / "shards" / "00000" / "vision.bin"
    os.truncate(path, path.stat().st_size - 3)
    problems = verify_store(root)
    assert any("shard 00000: vision.bin has" in p and "the index expects" in p for p in problems)
    assert any("vision.bin sha256 mismatch" in p for p in problems)
    with pytest.raises(StoreError, match="vision.bin has .* bytes, the index expects"):
        FeatureStore(root)


def test_verify_catches_index_inconsistency(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write(root, range(4), shard_size=4)
    ipath = root / "shards" / "00000" / "index.npz"
    with np.load(ipath, allow_pickle=False) as npz:
        index = dict(npz)
    index["missing"][0, 0] = True  # clip 0 has audio rows
    index["ids"][1] = "00000"
    np.savez(ipath, **index)
    _patch_sha(root, "00000", "index.npz")
    problems = verify_store(root)
    assert any("duplicate clip ids" in p for p in problems)
    assert any("clip '00000' has audio length" in p and "missing flag" in p for p in problems)


# --------------------------------------------------------------------------- info


def test_store_info_and_format_info(tmp_path: Path) -> None:
    root = tmp_path / "s"
    prov = {
        "audio": {"backbone": "audeering/w2v", "settings": {"seconds": 12}},
        "vision": {"backbone": "vit", "settings": {}},
        "text": {"backbone": "gte", "settings": {}},
    }
    write(root, range(10), shard_size=4, modalities=prov)
    info = store_info(root)
    clips = [make_clip(i) for i in range(10)]
    audio_lengths = [len(c.audio) for c in clips if c.audio is not None]
    assert info["n_clips"] == 10 and info["n_shards"] == 3 and info["superseded"] == 0
    assert info["format_version"] == 1 and info["dtype"] == "float16" and info["dims"] == DIMS
    assert info["missing"] == {"audio": 2, "vision": 1, "text": 3}
    assert info["lengths"]["audio"] == {
        "min": min(audio_lengths),
        "mean": pytest.approx(float(np.mean(audio_lengths))),
        "max": max(audio_lengths),
    }
    on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert info["bytes"] == on_disk
    assert info["modalities"] == prov
    json.dumps(info)  # plain values only
    text = format_info(info)
    assert "clips        10" in text and "audeering/w2v" in text and "float16" in text


# --------------------------------------------------------------------------- pickling


def test_pickle_drops_memmaps_and_reopens(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write(root, range(6), text_tokens=True, shard_size=3)
    store = FeatureStore(root)
    before = [store.get(i) for i in range(6)]  # opens memmaps
    assert store._maps
    blob = pickle.dumps(store)
    assert len(blob) < 4000  # index only, no feature data
    clone = pickle.loads(blob)
    assert not clone._maps and clone.ids == store.ids
    for i in range(6):
        assert_clip_equal(clone.get(i), make_clip(i, text_tokens=True), "float16")
    assert isinstance(clone.get(0).audio, np.memmap)
    del before

    # A fresh interpreter (as a spawned DataLoader worker) reads from the pickle alone.
    code = (
        "import pickle, sys; s = pickle.load(sys.stdin.buffer); "
        "print(sum(float(s[i].audio.astype('float64').sum()) for i in range(len(s)) "
        "if s[i].audio is not None))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=blob, capture_output=True, check=True, timeout=60
    )
    expected = sum(
        float(c.audio.astype(np.float16).astype(np.float64).sum())
        for c in (make_clip(i) for i in range(6))
        if c.audio is not None
    )
    assert float(out.stdout) == pytest.approx(expected)
