"""The command line end to end on a tiny ABAW-layout tree built by the test:
extract (ABAW root: raw/ videos, audio/*.mp3, face_images/) -> train -> predict -> check-submission."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
from PIL import Image
from test_extract import fake_encoders, write_clip

from taemi.store import FeatureStore

TINY = [
    "--set",
    "model.hidden=16",
    "--set",
    "model.heads=2",
    "--set",
    "model.sa_ffn=32",
    "--set",
    "model.head_hidden=16",
    "--set",
    "train.max_epochs=2",
    "--set",
    "train.batch_size=4",
]


def _frames(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.full((48, 64, 3), rng.integers(0, 255), dtype=np.uint8) for _ in range(n)]


@pytest.fixture()
def abaw(tmp_path: Path) -> Path:
    root = tmp_path / "abaw"
    (root / "raw").mkdir(parents=True)
    (root / "audio").mkdir()
    ids = [f"{i:05d}" for i in range(10)]
    for i, cid in enumerate(ids):
        write_clip(root / "raw" / f"{cid}.mp4", hz=300 + 40 * i, seconds=1.0, frames=_frames(5, i))
    write_clip(root / "audio" / "00003.wav", hz=900.0, seconds=1.0)  # separate audio for one clip
    (root / "audio" / "00003.wav").rename(
        root / "audio" / "00003.mp3"
    )  # name as ABAW does (content: wav)
    faces = root / "face_images" / "00001"
    faces.mkdir(parents=True)
    for k in (1, 2, 10):
        Image.fromarray(np.full((32, 32, 3), 10 * k, dtype=np.uint8)).save(faces / f"{k}.jpg")
    rng = np.random.default_rng(0)
    for split, part in (("train", ids[:7]), ("valid", ids[7:])):
        with open(root / f"{split}_split.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(
                [
                    "Filename",
                    "Admiration",
                    "Amusement",
                    "Determination",
                    "Empathic Pain",
                    "Excitement",
                    "Joy",
                ]
            )
            for cid in part:
                w.writerow([cid, *np.round(rng.random(6), 3)])
    with open(root / "test_ids.csv", "w", newline="") as fh:
        fh.write("Filename\n" + "".join(f"{c}\n" for c in ids[7:]))
    return root


def test_abaw_tree_end_to_end(abaw: Path, tmp_path: Path, monkeypatch) -> None:
    enc = fake_encoders()
    monkeypatch.setattr("taemi.extract.profiles.load_encoders", lambda *a, **k: enc)
    store = tmp_path / "store"
    code, out = run_main(["extract", "--input", str(abaw), "--out", str(store), "--no-progress"])
    assert code == 0, out
    assert "10 done" in out
    fs = FeatureStore(store)
    assert sorted(fs.ids) == [f"{i:05d}" for i in range(10)]  # leading zeros kept
    assert (
        len(fs.get("00001").vision) == 3
    )  # from face_images/00001/{1,2,10}.jpg, not the 5 video frames
    assert len(fs.get("00002").vision) == 5
    a3, a4 = fs.get("00003").audio, fs.get("00004").audio
    assert a3 is not None and not np.allclose(
        np.asarray(a3, np.float32)[:5], np.asarray(a4, np.float32)[:5]
    )

    run = tmp_path / "run"
    code, out = run_main(
        [
            "train",
            "--store",
            str(store),
            "--train",
            str(abaw / "train_split.csv"),
            "--valid",
            str(abaw / "valid_split.csv"),
            "--out",
            str(run),
            "--no-progress",
            *TINY,
        ]
    )
    assert code == 0, out
    sub = tmp_path / "submission.csv"
    code, out = run_main(
        [
            "predict",
            "--run",
            str(run),
            "--store",
            str(store),
            "--ids",
            str(abaw / "test_ids.csv"),
            "--out",
            str(sub),
            "--no-progress",
        ]
    )
    assert code == 0, out
    rows = list(csv.reader(open(sub)))
    assert rows[0][0] == "Filename" and [r[0] for r in rows[1:]] == ["00007", "00008", "00009"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])
    code, out = run_main(["check-submission", str(sub), "--ids", str(abaw / "test_ids.csv")])
    assert code == 0, out
