"""A run folder and a feature store written before the redesign still work.

``tests/assets/v0.1/`` was written by taemi at commit 05b02d6, before the run folder,
the store and inference moved to their own modules: ``taemi synth`` (24 clips, dims
12/10/8, seed 3), ``taemi train`` of a tiny paper model for 2 epochs in fp32, and
``taemi predict --store --no-clip`` into ``predictions.csv`` (plots left out). The
current code must read the store, load the run and predict the same values, evaluate it,
and resume it from its ``state.pt``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main

from taemi.inference import Predictor
from taemi.store import FeatureStore, verify_store

ASSET = Path(__file__).parent / "assets" / "v0.1"


def read_predictions(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[1:]
    return [r[0] for r in rows], np.array([[float(v) for v in r[1:]] for r in rows])


def test_old_store_verifies_and_reads() -> None:
    assert verify_store(ASSET / "store") == []
    store = FeatureStore(ASSET / "store")
    assert len(store) == 24 and store.dims == {"audio": 12, "vision": 10, "text": 8}


def test_old_run_predicts_what_it_predicted_then() -> None:
    ids, before = read_predictions(ASSET / "predictions.csv")
    store = FeatureStore(ASSET / "store")
    predictor = Predictor.from_run(ASSET / "run", "best", device="cpu", precision="fp32")
    predictor.check_store(store)
    now = predictor.predict(predictor.dataset(store, ids=ids))  # (24, 6)
    np.testing.assert_allclose(now, before, rtol=0, atol=1e-6)


def test_old_run_evaluates_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    shutil.copytree(ASSET / "run", run)
    code, out = run_main(
        [
            "evaluate",
            "--run",
            str(run),
            "--store",
            str(ASSET / "store"),
            "--labels",
            str(ASSET / "valid.csv"),
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert code == 0 and "mean" in out
    # the run finished its 2 epochs: resuming reads state.pt and has nothing left to train
    code, _ = run_main(
        [
            "train",
            "--store",
            str(ASSET / "store"),
            "--train",
            str(ASSET / "train.csv"),
            "--valid",
            str(ASSET / "valid.csv"),
            "--out",
            str(run),
            "--resume",
            "--no-progress",
        ]
    )
    assert code == 0
    assert (run / "best.safetensors").read_bytes() == (
        ASSET / "run" / "best.safetensors"
    ).read_bytes()
