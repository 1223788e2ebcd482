"""The one inference entry point (taemi.inference.Predictor): every caller that predicts
from a trained run goes through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from taemi.inference import Predictor, load_run
from taemi.train.modes import make_dataset
from taemi.train.trainer import train


class _Reached(Exception):
    """Raised by the spy: the caller reached the entry point."""


@pytest.fixture
def entry_calls(monkeypatch) -> list[tuple]:
    """Replace ``Predictor.from_run`` by a spy that records its arguments and stops the caller."""
    calls: list[tuple] = []

    def spy(cls, run, which="best", **kw):
        calls.append((str(run), which))
        raise _Reached

    monkeypatch.setattr(Predictor, "from_run", classmethod(spy))
    return calls


def test_evaluate_goes_through_the_entry_point(tmp_path: Path, entry_calls) -> None:
    from taemi.cli.main import main

    with pytest.raises(_Reached):
        main(
            [
                "evaluate",
                "--run",
                str(tmp_path / "RUN"),
                "--which",
                "last",
                "--store",
                "S",
                "--labels",
                "L.csv",
            ]
        )
    assert entry_calls == [(str(tmp_path / "RUN"), "last")]


def test_predict_store_goes_through_the_entry_point(tmp_path: Path, entry_calls) -> None:
    from taemi.cli.main import main

    with pytest.raises(_Reached):
        main(
            [
                "predict",
                "--run",
                str(tmp_path / "RUN"),
                "--store",
                "S",
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
    assert entry_calls == [(str(tmp_path / "RUN"), "best")]


def test_predict_media_goes_through_the_entry_point(tmp_path: Path, entry_calls) -> None:
    from taemi import predict_media as pm

    pm._RUNS.clear()
    with pytest.raises(_Reached):
        pm.predict_media(tmp_path / "RUN", [tmp_path], which="last")
    assert entry_calls == [(str(tmp_path / "RUN"), "last")]


def test_robustness_goes_through_the_entry_point(
    tmp_path: Path, entry_calls, store, labels
) -> None:
    from taemi.experiments.robustness import robustness_suite

    with pytest.raises(_Reached):
        robustness_suite(tmp_path / "RUN", store, labels[1])
    assert entry_calls == [(str(tmp_path / "RUN"), "best")]


def test_demo_goes_through_the_entry_point(tmp_path: Path, entry_calls, synth, monkeypatch) -> None:
    from taemi import demo

    data = {
        "store": synth.store,
        "train_csv": synth.train_csv,
        "valid_csv": synth.valid_csv,
        "oracle": 1.0,
    }
    monkeypatch.setattr(demo, "_feature_data", lambda *a, **kw: data)
    monkeypatch.setattr(
        demo, "train", lambda *a, **kw: None
    )  # the entry point is what is checked here
    with pytest.raises(_Reached):
        demo.run_demo(tmp_path / "demo", synthetic_features=True, progress=False)
    assert entry_calls == [(str(tmp_path / "demo" / "run"), "best")]


def test_predictor_predicts_as_the_run_validated(
    tmp_path: Path, store, labels, tiny_config
) -> None:
    cfg = tiny_config("train.max_epochs=1")
    res = train(cfg, store, *labels, tmp_path / "run", progress=False)
    predictor = Predictor.from_run(res.run_dir)
    predictor.check_store(store)
    pred = predictor.predict(predictor.dataset(store, labels[1]), check="test")  # (N, E)
    model, run_cfg = load_run(res.run_dir)
    from taemi.eval.predict import predict_dataset

    want, _ = predict_dataset(
        model, make_dataset(run_cfg, store, labels[1]), batch_size=run_cfg.train.eval_batch_size
    )
    np.testing.assert_array_equal(pred, want)
    assert pred.shape == (len(labels[1]), len(run_cfg.data.emotions))
