"""Experiment tracking: TensorBoard event files and an optional MLflow run, fed by the trainer.

Every run (``taemi train``, a CV fold, an ablation run: they all call
:func:`taemi.train.trainer.train`) can report to two trackers:

- TensorBoard (``train.tensorboard``: ``auto`` | ``on`` | ``off``; the ``tracking`` extra,
  ``pip install 'taemi[tracking]'``): event files in ``RUN/tensorboard/`` (the name is
  :data:`taemi.run.TENSORBOARD_DIR`), so ``tensorboard --logdir runs/`` compares a whole
  study. Per epoch (step = epoch) the scalars ``loss/train``, ``loss/valid``,
  ``pearson/mean``, ``pearson/<emotion>``, ``lr`` and ``seconds``, the values of
  ``history.csv``; at step 0 the resolved config as text (YAML); at the end the best
  epoch's validation metrics as text and as hyper-parameters (the HParams dashboard: the
  flattened config against ``best/mean_pearson``).
- MLflow (``train.mlflow_uri``, empty: off; ``train.mlflow_experiment``; ``pip install
  mlflow``, in no extra): one MLflow run per training run with the flattened config as
  params, the history's columns as metrics per epoch (step = epoch), the best epoch's
  scores as ``best_*`` metrics, and ``metrics.json``, ``history.csv``, ``config.yaml`` and
  ``plots/`` as artifacts.

A tracker's package is imported only when the tracker is wanted, and a missing one
(``on``, or an MLflow URI) is a :class:`~taemi.config.ConfigError` raised before the run
folder is touched. ``auto`` logs once (INFO) whether it writes event files.

Only the main process (rank 0 under DDP) creates trackers. A tracker that cannot start
(before the first epoch: nothing is trained yet) is a ``ConfigError`` naming the key to
fix. A tracker that fails once training runs (an MLflow server gone mid-run, a full disk)
does not stop the training: it logs one WARNING naming the tracker and the error and is
off for the rest of the run. That is the one fallback here, because tracking only
observes a run whose own record (``history.csv``, ``metrics.json``) is complete anyway.

Resuming (``--resume``): TensorBoard adds a new event file to the same folder and logs the
epochs from the one the run resumes at, so no epoch is logged twice (an epoch whose
``state.pt`` was saved just before a kill, but not its event, stays missing there;
``history.csv`` has it). The config text of a run resumed after epoch N is logged at step
N (runtime keys such as ``train.device`` may differ from step 0's). Resuming a finished run
logs its end (best epoch, hyper-parameters) again at the same steps; where a step holds
two values, TensorBoard's scalar charts show the latest. MLflow starts a new MLflow run
(params are immutable in a run) tagged ``taemi.resumed_at_epoch``, holding the epochs from
there on.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from taemi.config import ConfigError, RunConfig
from taemi.run import (
    CONFIG_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    TENSORBOARD_DIR,
)

log = logging.getLogger(__name__)

#: What to install for each tracker (named in the errors).
TENSORBOARD_PIP = "pip install 'taemi[tracking]'"
MLFLOW_PIP = "pip install mlflow"
#: MLflow servers take at most 100 params per request.
_MLFLOW_PARAMS_PER_BATCH = 100


class Tracker(Protocol):
    """One destination of a run's record; the trainer calls it through :class:`Trackers`."""

    name: str  # how messages name it ("TensorBoard", "MLflow")
    off: str  # the setting that trains without it (named in errors)

    def start(self, run_dir: Path, cfg: RunConfig, first_epoch: int) -> None: ...

    def epoch(self, epoch: int, row: dict) -> None: ...

    def end(self, metrics: dict) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- shared helpers


def flat_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """The config as dotted keys (``train.lr``) -> scalars; lists become comma-joined text."""
    out: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (list, tuple)):
            out[prefix[:-1]] = ",".join(str(v) for v in value)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix[:-1]] = value
        else:
            out[prefix[:-1]] = str(value)

    walk("", cfg.to_dict())
    return out


def _config_markdown(cfg: RunConfig) -> str:
    """The resolved config as YAML in a markdown code block (as ``RUN/config.yaml``)."""
    return "```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```"


def _best_scores(metrics: dict) -> dict[str, float]:
    """``metrics.json``'s validation block as flat scores (``mean_pearson``,
    ``pearson_<emotion>``, ``ccc_<emotion>``, ...); empty when trained without validation."""
    valid = metrics.get("valid")
    if not isinstance(valid, dict):
        return {}
    out: dict[str, float] = {}
    for k, v in valid.items():
        if isinstance(v, dict):
            out.update({f"{k}_{e}": float(x) for e, x in v.items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n":
            out[k] = float(v)
    return out


def _numbers(row: dict) -> Iterator[tuple[str, float]]:
    """A history row's values besides the epoch (every one is a number)."""
    for k, v in row.items():
        if k != "epoch":
            yield k, float(v)


# --------------------------------------------------------------------------- TensorBoard


def _scalar_tag(column: str) -> str:
    """history.csv column -> TensorBoard tag (grouped in the dashboard by their prefix)."""
    if column == "train_loss":
        return "loss/train"
    if column == "valid_loss":
        return "loss/valid"
    if column == "valid_mean_pearson":
        return "pearson/mean"
    if column.startswith("pearson_"):
        return "pearson/" + column[len("pearson_") :]
    return column  # lr, seconds


class TensorBoardTracker:
    """Event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard.SummaryWriter``)."""

    name = "TensorBoard"
    off = "train.tensorboard=off"  # how to train without it

    def __init__(self, summary_writer: type) -> None:
        self._writer_cls = summary_writer  # SummaryWriter (passed in: tests use stand-ins)
        self.writer: Any = None
        self.cfg: RunConfig | None = None

    def start(self, run_dir: Path, cfg: RunConfig, first_epoch: int) -> None:
        self.writer = self._writer_cls(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        self.cfg = cfg
        # step 0 for a new run; N for a run resumed after epoch N (the config it resumed with)
        self.writer.add_text("config", _config_markdown(cfg), first_epoch - 1)
        self.writer.flush()

    def epoch(self, epoch: int, row: dict) -> None:
        for column, value in _numbers(row):
            self.writer.add_scalar(_scalar_tag(column), value, epoch)
        self.writer.flush()  # a killed run keeps its finished epochs

    def end(self, metrics: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        best_epoch = int(metrics["best_epoch"])
        scores = _best_scores(metrics)
        if scores:
            lines = ["| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.6g} |" for k, v in scores.items()]
            text = f"best epoch {best_epoch} of {metrics.get('epochs_run')}\n\n" + "\n".join(lines)
        else:
            text = f"trained without validation: {metrics.get('epochs_run')} epochs"
        self.writer.add_text("best", text, best_epoch)
        best = {"best/mean_pearson": scores["mean_pearson"]} if "mean_pearson" in scores else {}
        assert self.cfg is not None
        for summary in hparams(flat_config(self.cfg), best):  # experiment, session start, end
            self.writer._get_file_writer().add_summary(summary)
        for tag, value in best.items():  # the HParams dashboard reads its metrics as scalars
            self.writer.add_scalar(tag, value, best_epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


# --------------------------------------------------------------------------- MLflow


class MLflowTracker:
    """One MLflow run per training run, through ``mlflow.MlflowClient`` (no global active
    run, so runs in one process, such as CV folds, do not interfere)."""

    name = "MLflow"
    off = "an empty train.mlflow_uri"  # how to train without it

    def __init__(self, mlflow: Any, entities: Any, uri: str, experiment: str) -> None:
        self.mlflow = mlflow  # the mlflow module (passed in: tests use a stand-in)
        self.entities = entities  # mlflow.entities (Param, Metric)
        self.uri, self.experiment = uri, experiment
        self.client: Any = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None

    def start(self, run_dir: Path, cfg: RunConfig, first_epoch: int) -> None:
        self.run_dir = Path(run_dir)
        self.client = self.mlflow.MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        exp_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(self.experiment)
        )
        tags = {"taemi.run_dir": str(self.run_dir.resolve()), "taemi.preset": cfg.preset}
        if first_epoch > 1:
            tags["taemi.resumed_at_epoch"] = str(first_epoch)
        run = self.client.create_run(exp_id, run_name=self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        params = [self.entities.Param(k, str(v)) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), _MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _MLFLOW_PARAMS_PER_BATCH])

    def _log(self, values: dict[str, float], step: int) -> None:
        ms = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, v, ms, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def epoch(self, epoch: int, row: dict) -> None:
        self._log(dict(_numbers(row)), epoch)

    def end(self, metrics: dict) -> None:
        best = {f"best_{k}": v for k, v in _best_scores(metrics).items()}
        best["best_epoch"] = float(metrics["best_epoch"])
        self._log(best, int(metrics["best_epoch"]))
        assert self.run_dir is not None
        for name in (METRICS_FILE, HISTORY_FILE, CONFIG_FILE):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / PLOTS_DIR).is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir / PLOTS_DIR), PLOTS_DIR)
        run_id, self.run_id = self.run_id, None
        self.client.set_terminated(run_id, "FINISHED")

    def close(self) -> None:
        if self.run_id is not None:  # end() was not reached: the training failed or stopped
            run_id, self.run_id = self.run_id, None
            self.client.set_terminated(run_id, "FAILED")


# --------------------------------------------------------------------------- the trainer's view


class Trackers:
    """The run's trackers, called by the trainer at its start, after every epoch and at its
    end. A tracker failing after :meth:`start` is logged once (WARNING) and dropped."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.active: list[Tracker] = list(trackers)
        self._started: list[Tracker] = []

    def start(self, run_dir: Path, cfg: RunConfig, first_epoch: int) -> None:
        """Start every tracker; one that cannot start is a ConfigError (nothing is trained yet)."""
        for t in self.active:
            self._started.append(t)  # closed in close() even if its start fails half-way
            try:
                t.start(run_dir, cfg, first_epoch)
            except Exception as e:
                raise ConfigError(
                    f"{t.name} tracking could not start for {run_dir} ({type(e).__name__}: {e}); "
                    f"fix that, or train without it ({t.off})"
                ) from e

    def _each(self, what: str, call: Any) -> None:
        for t in list(self.active):
            try:
                call(t)
            except Exception as e:  # noqa: BLE001 - any library's error; tracking only observes
                log.warning(
                    "%s tracking failed at %s (%s: %s); it is off for the rest of this run, "
                    "training goes on (history.csv and metrics.json are complete)",
                    t.name,
                    what,
                    type(e).__name__,
                    e,
                )
                self.active.remove(t)

    def epoch(self, epoch: int, row: dict) -> None:
        """Log one finished epoch's history row (step = epoch)."""
        self._each(f"epoch {epoch}", lambda t: t.epoch(epoch, row))

    def end(self, metrics: dict) -> None:
        """Log the finished run's ``metrics.json`` (the best epoch's scores) and artifacts."""
        self._each("the end of the run", lambda t: t.end(metrics))

    def close(self) -> None:
        """Close every started tracker (also after a failure); errors are warnings."""
        started, self._started = self._started, []
        for t in started:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 - as in _each
                log.warning("%s tracking could not be closed (%s: %s)", t.name, type(e).__name__, e)
        self.active = []


def _summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; ImportError without the tensorboard package."""
    importlib.import_module("tensorboard")  # torch's module imports it too; fail on it first
    return importlib.import_module("torch.utils.tensorboard").SummaryWriter


def make_trackers(cfg: RunConfig, *, main: bool) -> Trackers:
    """The trackers ``cfg`` asks for (``train.tensorboard``, ``train.mlflow_uri``).

    A package that a setting needs and is missing is a :class:`ConfigError` naming what to
    install, on every process (the environment is the same everywhere); only the main
    process (``main``) gets trackers."""
    tc = cfg.train
    trackers: list[Tracker] = []
    if tc.tensorboard != "off":
        try:
            writer_cls: type | None = _summary_writer()
        except ImportError as e:
            if tc.tensorboard == "on":
                raise ConfigError(
                    f"train.tensorboard=on needs the tensorboard package ({e}): {TENSORBOARD_PIP}, "
                    "or set train.tensorboard=off"
                ) from None
            writer_cls = None
        if main and tc.tensorboard == "auto":
            log.info(
                "train.tensorboard=auto: %s",
                f"event files in RUN/{TENSORBOARD_DIR}/ (tensorboard is installed)"
                if writer_cls is not None
                else f"no event files (the tensorboard package is not installed: {TENSORBOARD_PIP})",
            )
        if writer_cls is not None and main:
            trackers.append(TensorBoardTracker(writer_cls))
    if tc.mlflow_uri.strip():
        try:
            mlflow = importlib.import_module("mlflow")
            entities = importlib.import_module("mlflow.entities")
        except ImportError as e:
            raise ConfigError(
                f"train.mlflow_uri={tc.mlflow_uri!r} needs the mlflow package ({e}): {MLFLOW_PIP}, "
                "or leave train.mlflow_uri empty"
            ) from None
        if main:
            trackers.append(
                MLflowTracker(mlflow, entities, tc.mlflow_uri.strip(), tc.mlflow_experiment)
            )
    return Trackers(trackers)
