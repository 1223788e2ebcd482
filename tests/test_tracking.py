"""Experiment tracking (taemi.train.tracking): TensorBoard event files in every run folder,
equal to history.csv; the train.tensorboard switch; MLflow through a stand-in module;
a tracker failing mid-run; resumed runs; CV folds."""

from __future__ import annotations

import csv
import json
import logging
import sys
import types
from pathlib import Path

import pytest
from conftest import run_main, split_args, tiny_cli_sets

from taemi.config import ConfigError
from taemi.data.labels import EMI_EMOTIONS
from taemi.run import TENSORBOARD_DIR
from taemi.train import tracking
from taemi.train.trainer import train

pytest.importorskip("tensorboard", reason="the tracking extra: pip install 'taemi[tracking]'")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from tensorboard.util import tensor_util


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch) -> None:
    """`taemi train` / `taemi cv` would set one torch thread per core otherwise."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _train_argv(synth, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        *split_args(synth, out),
        "--no-progress",
        *tiny_cli_sets(),
        "--set",
        "train.patience=0",
        *extra,
    ]


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice ({steps})"
    return {e.step: e.value for e in events}


def _text(acc: EventAccumulator, tag: str) -> str:
    (event,) = acc.Tensors(f"{tag}/text_summary")
    return tensor_util.make_ndarray(event.tensor_proto).item().decode()


def _history(run: Path) -> list[dict[str, float]]:
    with open(run / "history.csv", newline="") as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


# --------------------------------------------------------------------------- TensorBoard


@pytest.fixture(scope="module")
def cli_run(synth, tmp_path_factory) -> Path:
    """`taemi train` (3 epochs) with the default train.tensorboard=auto."""
    out = tmp_path_factory.mktemp("tb") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        code, _ = run_main(_train_argv(synth, out))
    assert code == 0
    return out


def test_event_file_holds_the_history(cli_run: Path) -> None:
    assert list((cli_run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    acc = _events(cli_run)
    rows = _history(cli_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for tag, column in [
        ("loss/train", "train_loss"),
        ("loss/valid", "valid_loss"),
        ("pearson/mean", "valid_mean_pearson"),
        (f"pearson/{EMI_EMOTIONS[0]}", f"pearson_{EMI_EMOTIONS[0]}"),
        (f"pearson/{EMI_EMOTIONS[-1]}", f"pearson_{EMI_EMOTIONS[-1]}"),
        ("lr", "lr"),
        ("seconds", "seconds"),
    ]:
        logged = _scalars(acc, tag)
        assert sorted(logged) == [1, 2, 3], tag
        for r in rows:  # event files hold float32
            assert logged[int(r["epoch"])] == pytest.approx(r[column], rel=1e-6, abs=1e-9), tag

    config = _text(acc, "config")
    assert config.startswith("```yaml\n") and config.endswith("```")
    assert "lr: 0.001" in config and "hidden: 16" in config

    metrics = json.loads((cli_run / "metrics.json").read_text())
    best = _scalars(acc, "best/mean_pearson")
    assert best == {
        metrics["best_epoch"]: pytest.approx(metrics["valid"]["mean_pearson"], rel=1e-6)
    }
    assert f"best epoch {metrics['best_epoch']} of 3" in _text(acc, "best")
    # the HParams dashboard: the flattened config against best/mean_pearson
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["train.lr"].number_value == pytest.approx(1e-3)
    assert hp["data.emotions"].string_value == ",".join(EMI_EMOTIONS)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert [m.name.tag for m in experiment.experiment.metric_infos] == ["best/mean_pearson"]


def test_training_on_all_logs_without_validation(tmp_path, store, labels, tiny_config) -> None:
    run = tmp_path / "run"
    train(tiny_config(), store, labels[0], None, run, fixed_epochs=2, progress=False)
    acc = _events(run)
    assert sorted(acc.Tags()["scalars"]) == ["loss/train", "lr", "seconds"]
    assert sorted(_scalars(acc, "loss/train")) == [1, 2]
    assert _text(acc, "best") == "trained without validation: 2 epochs"


def test_tensorboard_off_writes_nothing(synth, tmp_path) -> None:
    out = tmp_path / "run"
    code, _ = run_main(
        _train_argv(synth, out, "--set", "train.max_epochs=1", "--set", "train.tensorboard=off")
    )
    assert code == 0
    assert (out / "history.csv").is_file()
    assert not (out / TENSORBOARD_DIR).exists()


def _hide_tensorboard(monkeypatch) -> None:
    """Make `import tensorboard` (and torch's module over it) fail, as without the package."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_tensorboard_on_without_the_package_is_refused_before_training(
    synth, tmp_path, monkeypatch, capsys
) -> None:
    _hide_tensorboard(monkeypatch)
    out = tmp_path / "run"
    code, _ = run_main(_train_argv(synth, out, "--set", "train.tensorboard=on"))
    assert code == 2
    err = capsys.readouterr().err
    assert "train.tensorboard=on needs the tensorboard package" in err
    assert "pip install 'taemi[tracking]'" in err
    assert not out.exists()  # refused before the run folder was made


def test_auto_says_what_it_chose(tiny_config, monkeypatch, caplog) -> None:
    cfg = tiny_config()
    assert cfg.train.tensorboard == "auto"
    with caplog.at_level(logging.INFO, logger="taemi.train.tracking"):
        assert [t.name for t in tracking.make_trackers(cfg, main=True).active] == ["TensorBoard"]
        _hide_tensorboard(monkeypatch)
        assert tracking.make_trackers(cfg, main=True).active == []
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "train.tensorboard=auto: event files in RUN/tensorboard/ (tensorboard is installed)",
        (
            "train.tensorboard=auto: no event files (the tensorboard package is not "
            "installed: pip install 'taemi[tracking]')"
        ),
    ]


def test_only_the_main_process_tracks(tiny_config) -> None:
    cfg = tiny_config("train.tensorboard=on")
    assert tracking.make_trackers(cfg, main=False).active == []


def test_tensorboard_key_is_checked(tiny_config) -> None:
    with pytest.raises(ConfigError, match="train.tensorboard='yes': expected auto\\|on\\|off"):
        tiny_config("train.tensorboard=yes")


# --------------------------------------------------------------------------- failures, resume


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(
    tmp_path, store, labels, tiny_config, monkeypatch, caplog
) -> None:
    real_epoch = tracking.TensorBoardTracker.epoch

    def flaky(self, epoch: int, row: dict) -> None:
        if epoch >= 2:
            raise OSError("disk full")
        real_epoch(self, epoch, row)

    monkeypatch.setattr(tracking.TensorBoardTracker, "epoch", flaky)
    cfg = tiny_config("train.max_epochs=3", "train.patience=0")
    with caplog.at_level(logging.WARNING, logger="taemi.train.tracking"):
        res = train(cfg, store, *labels, tmp_path / "run", progress=False)
    assert len(res.history) == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["finished"] is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "TensorBoard tracking failed at epoch 2 (OSError: disk full)" in warnings[0]
    assert "off for the rest of this run" in warnings[0]
    acc = _events(tmp_path / "run")
    assert sorted(_scalars(acc, "loss/train")) == [1]  # off from epoch 2 on: no end either
    assert "best/mean_pearson" not in acc.Tags()["scalars"]


def test_resumed_run_appends_without_logging_an_epoch_twice(
    tmp_path, store, labels, tiny_config
) -> None:
    cfg = tiny_config("train.max_epochs=3", "train.patience=0")
    run = tmp_path / "run"

    def interrupt(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, *labels, run, progress=False, callbacks=[interrupt])
    train(cfg, store, *labels, run, resume=True, progress=False)
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    logged = _scalars(_events(run), "pearson/mean")  # fails on a step logged twice
    assert logged == {
        int(r["epoch"]): pytest.approx(r["valid_mean_pearson"], rel=1e-6) for r in _history(run)
    }
    assert sorted(logged) == [1, 2, 3]
    # the config at step 0, and again (as resumed) at step 2
    assert [e.step for e in _events(run).Tensors("config/text_summary")] == [0, 2]


def test_a_tracker_that_cannot_start_stops_the_run_before_training(
    tmp_path, store, labels, tiny_config, monkeypatch
) -> None:
    class Unwritable:
        def __init__(self, log_dir: str) -> None:
            raise PermissionError(f"cannot write {log_dir}")

    monkeypatch.setattr(tracking, "_summary_writer", lambda: Unwritable)
    run = tmp_path / "run"
    with pytest.raises(
        ConfigError, match="TensorBoard tracking could not start .*train.tensorboard=off"
    ):
        train(tiny_config(), store, *labels, run, progress=False)
    assert not run.exists()  # a failed start leaves no stub


# --------------------------------------------------------------------------- MLflow (stand-in)


class _Recorder:
    """What the stand-in MlflowClient was asked to do, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fail_on: str | None = None
        self.experiments: dict[str, object] = {}  # what get_experiment_by_name finds


def _stand_in_mlflow(monkeypatch, rec: _Recorder) -> None:
    """A fake `mlflow` package (MlflowClient + entities) recording every call."""
    entities = types.ModuleType("mlflow.entities")
    entities.Param = lambda key, value: ("param", key, value)
    entities.Metric = lambda key, value, timestamp, step: ("metric", key, value, step)

    class MlflowClient:
        def __init__(self, tracking_uri: str) -> None:
            rec.calls.append(("client", tracking_uri))

        def _call(self, name: str, *args):
            if rec.fail_on == name:
                raise ConnectionError("mlflow server unreachable")
            rec.calls.append((name, *args))

        def get_experiment_by_name(self, name: str):
            self._call("get_experiment_by_name", name)
            return rec.experiments.get(name)

        def create_experiment(self, name: str) -> str:
            self._call("create_experiment", name)
            return "exp-1"

        def create_run(self, experiment_id: str, run_name: str, tags: dict):
            self._call("create_run", experiment_id, run_name, tags)
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

        def log_batch(self, run_id: str, metrics=(), params=()):
            self._call("log_batch", run_id, list(metrics), list(params))

        def log_artifact(self, run_id: str, path: str):
            self._call("log_artifact", run_id, path)

        def log_artifacts(self, run_id: str, path: str, artifact_path: str):
            self._call("log_artifacts", run_id, path, artifact_path)

        def set_terminated(self, run_id: str, status: str):
            self._call("set_terminated", run_id, status)

    mlflow = types.ModuleType("mlflow")
    mlflow.MlflowClient = MlflowClient
    mlflow.entities = entities
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)


def test_mlflow_receives_params_metrics_per_epoch_and_artifacts(
    tmp_path, store, labels, tiny_config, monkeypatch
) -> None:
    rec = _Recorder()
    _stand_in_mlflow(monkeypatch, rec)
    cfg = tiny_config(
        "train.max_epochs=2",
        "train.patience=0",
        "train.tensorboard=off",
        "train.mlflow_uri=http://mlflow.example:5000",
        "train.mlflow_experiment=emi",
    )
    run = tmp_path / "run"
    res = train(cfg, store, *labels, run, progress=False)

    names = [c[0] for c in rec.calls]
    assert rec.calls[0] == ("client", "http://mlflow.example:5000")
    assert ("create_experiment", "emi") in rec.calls
    (create,) = [c for c in rec.calls if c[0] == "create_run"]
    assert create[1] == "exp-1" and create[2] == "run"
    assert create[3]["taemi.run_dir"] == str(run.resolve())
    assert "taemi.resumed_at_epoch" not in create[3]

    batches = [c for c in rec.calls if c[0] == "log_batch"]
    params = {p[1]: p[2] for c in batches for p in c[3]}
    assert params["train.lr"] == "0.001" and params["model.hidden"] == "16"
    assert params["data.emotions"] == ",".join(EMI_EMOTIONS)
    assert params["train.mlflow_experiment"] == "emi"

    metrics = [m for c in batches for m in c[2]]
    for row in res.history:  # every history column, step = epoch
        for column, value in row.items():
            if column != "epoch":
                assert ("metric", column, float(value), row["epoch"]) in metrics
    best = {m[1]: (m[2], m[3]) for m in metrics if m[1].startswith("best_")}
    assert best["best_mean_pearson"] == (pytest.approx(res.best.mean_pearson), res.best_epoch)
    assert best["best_epoch"] == (float(res.best_epoch), res.best_epoch)

    artifacts = [Path(c[2]).name for c in rec.calls if c[0] == "log_artifact"]
    assert sorted(artifacts) == ["config.yaml", "history.csv", "metrics.json"]
    assert ("log_artifacts", "run-1", str(run / "plots"), "plots") in rec.calls
    assert names[-1] == "set_terminated" and rec.calls[-1] == (
        "set_terminated",
        "run-1",
        "FINISHED",
    )


def test_mlflow_server_down_mid_run_does_not_stop_training(
    tmp_path, store, labels, tiny_config, monkeypatch, caplog
) -> None:
    rec = _Recorder()
    _stand_in_mlflow(monkeypatch, rec)
    cfg = tiny_config(
        "train.max_epochs=2", "train.tensorboard=off", "train.mlflow_uri=http://mlflow.example"
    )
    real = tracking.MLflowTracker.epoch

    def then_down(self, epoch, row):
        real(self, epoch, row)
        rec.fail_on = "log_batch"

    monkeypatch.setattr(tracking.MLflowTracker, "epoch", then_down)
    monkeypatch.setattr(tracking.MLflowTracker, "end", lambda self, m: self._log({"x": 1.0}, 9))
    with caplog.at_level(logging.WARNING, logger="taemi.train.tracking"):
        res = train(cfg, store, *labels, tmp_path / "run", progress=False)
    assert len(res.history) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MLflow tracking failed at epoch 2" in warnings[0]
    assert "ConnectionError: mlflow server unreachable" in warnings[0]
    # closed as a run that did not end (set_terminated still answers)
    rec.fail_on = None
    assert rec.calls[-1] == ("set_terminated", "run-1", "FAILED")


def test_mlflow_without_the_package_is_refused(
    tmp_path, store, labels, tiny_config, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg = tiny_config("train.mlflow_uri=file:///tmp/mlruns")
    with pytest.raises(ConfigError, match="needs the mlflow package .*pip install mlflow"):
        train(cfg, store, *labels, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_mlflow_that_cannot_start_is_an_error_before_training(
    tmp_path, store, labels, tiny_config, monkeypatch
) -> None:
    rec = _Recorder()
    rec.fail_on = "create_run"
    _stand_in_mlflow(monkeypatch, rec)
    cfg = tiny_config("train.tensorboard=off", "train.mlflow_uri=http://down.example")
    with pytest.raises(ConfigError, match="MLflow tracking could not start .*ConnectionError"):
        train(cfg, store, *labels, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- CV folds


def test_cv_folds_write_event_files(synth, tmp_path) -> None:
    out = tmp_path / "cv"
    argv = [
        "cv",
        *split_args(synth, out),
        "--folds",
        "2",
        "--no-progress",
        *tiny_cli_sets(),
        "--set",
        "train.max_epochs=1",
    ]
    code, _ = run_main(argv)
    assert code == 0
    folds = sorted(out.glob("fold_*"))
    assert len(folds) == 2
    for fold in folds:
        assert sorted(_scalars(_events(fold), "pearson/mean")) == [1], fold
