"""Hyperparameter search over any config fields with Optuna (``taemi sweep``).

A *space* file (YAML) names the dotted config keys to search, one entry each::

    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}   # a float range, log scale
    train.batch_size: {low: 16, high: 64, step: 16}    # an integer range (the field is an int)
    model.head_dropout: {low: 0.0, high: 0.5}          # a float range, linear
    model.hidden: {choices: [64, 128]}                 # a categorical choice

Whether a range is searched over integers or floats follows the config field's type (not
the way the bounds are written), so ``model.head_dropout: {low: 0, high: 1}`` is a float range.
Every entry is checked before anything is trained, through the config's own override
machinery (:func:`taemi.config.apply_override`, then ``validate``): an unknown key, a
range on a field that is not a number, a bound or choice the config refuses, ``low >=
high``, a log range reaching 0, ``log`` with ``step``, or a step that does not divide the
range is a :class:`~taemi.config.ConfigError` naming the space file and the entry.

The study (Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework",
KDD 2019) maximises one value per trial, sampled by TPE (Bergstra et al., NeurIPS 2011):

- objective ``valid``: one run per trial, trained by the normal recipe
  (:func:`taemi.train.trainer.train`) on the training labels and selected on the
  validation labels; the value is the run's best validation mean Pearson
  (``metrics.json``). Each epoch's validation mean Pearson is reported to the trial and the
  median pruner (:class:`optuna.pruners.MedianPruner`) stops a trial whose curve is below
  the median of the finished trials' curves at the same epoch;
- objective ``cv``: k-fold cross-validation per trial (:func:`taemi.experiments.cv.run_cv`
  on the pooled label files, the folds fixed by ``--folds``, ``--fold-seed`` and
  ``--group-by``); the value is the pooled out-of-fold mean Pearson. A CV trial is not
  pruned: its folds' curves are not comparable epochs of one run.

A run that diverges (:class:`taemi.train.trainer.TrainingError`: a non-finite loss or
weights) ends its trial as *pruned*, with the message in the trial's ``diverged``
attribute: a learning rate that blows up is a poor point of the space, not a failure of
the search.

The sweep folder ``OUT``:

- ``study.db``: the Optuna study (SQLite), unless ``--storage`` gives another RDB URL
  (e.g. ``postgresql://...``, for several machines; ``OUT`` must then be a folder every
  machine sees, since interrupted trials resume their run folders from there);
- ``base_config.yaml`` and ``space.yaml``: the config the trials start from and the space,
  written by the first run; a rerun with another config or space is refused before any
  training. The study itself records both and the objective (its user attribute
  ``taemi.setup``), so a second folder joining the study with other settings is refused too;
- ``trials/trial_<k>/``: trial ``k``'s run folder (objective ``valid``) or cross-validation
  folder (``cv``);
- after every run: ``trials.csv`` (a row per trial: number, state, value, parameters,
  best epoch and epochs run, seconds, the run folder), ``best_config.yaml`` (the base config
  with the best trial's parameters: ``taemi train --config best_config.yaml`` trains it;
  the trainer resolves its automatic settings, e.g. ``data.length_quantum``, per device as
  usual), ``sweep.json`` (space, objective, storage, counts by state, best trial) and the
  figures ``objective.png`` (value per trial and the running best, pruned trials marked),
  ``importance.png`` (fANOVA parameter importances, :func:`optuna.importance.get_param_importances`;
  left out, with a note in ``sweep.json``, with fewer than 2 complete trials or fewer
  than 2 parameters) and ``parallel.png`` (parallel coordinates, a line per complete trial
  coloured by its value).

Trials and resumption. ``--trials N`` is the number of *finished* (complete or pruned)
trials the study should hold; a rerun starts trials until there are ``N`` (so a rerun
with a larger ``N`` extends a sweep). A complete or pruned trial is never trained again.
A trial that did not finish (Ctrl-C or SIGTERM: told ``FAIL`` by its process; a killed
process: its trial stays ``RUNNING`` until its heartbeat, written every
:data:`HEARTBEAT_SECONDS`, is older than :data:`GRACE_SECONDS`, when any process of the
sweep marks it ``FAIL``) is retried once per failure: a new trial with the same
parameters (enqueued, its ``retry_of`` attribute naming the first trial of the chain)
resumes the run folder of that first trial (``trials/trial_<retry_of>``: the trainer's
exact resume, or :func:`run_cv` reusing finished folds) and reports the epochs already
run to the pruner first. The bookkeeping (failing stale trials, enqueuing retries,
counting, asking for the next trial) runs under an exclusive lock (``OUT/.sweep.lock``),
so the ``--jobs`` processes of one sweep never retry one trial twice nor start more than
``N`` trials; a ``RUNNING`` trial with a live heartbeat belongs to a live process and is
left to it. A trial that fails with an error stops its process (and the sweep); a
rerun retries it once.

Sampling is reproducible for one process: the TPE sampler of each new trial is seeded
from ``--seed`` and the number of trials in the study, so a resumed sweep does not
repeat the random start-up points of its first run. With ``--jobs J`` the order in which
the processes ask makes the sequence machine-dependent.

``--jobs J`` runs J worker processes (``spawn``-started, as :mod:`taemi.experiments.cv`),
each asking the shared study for trials until ``N`` are finished; each gets 1/J of the
cores for its torch threads unless ``OMP_NUM_THREADS`` is set.

Optuna (and scikit-learn, for the fANOVA importances) come with the ``sweep`` extra
(``pip install 'taemi[sweep]'``); they are imported only by the sweep's functions.

Modules: the space file in :mod:`taemi.experiments.sweep_space`, the folder's file names
and outputs in :mod:`taemi.experiments.sweep_folder`, the study, the trials and their
resumption here.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taemi.config import RunConfig, flat_dict, load_config, save_config
from taemi.data.labels import Labels, read_labels
from taemi.experiments.sweep_folder import (
    BASE_CONFIG,
    LOCK_FILE,
    RETRY_OF,
    RUN_ATTR,
    SETUP_ATTR,
    SPACE_FILE,
    STUDY_DB,
    TRIALS_DIR,
    import_optuna,
    trial_dir,
    write_outputs,
)
from taemi.experiments.sweep_space import Param, apply_params, read_space
from taemi.experiments.workers import setup_worker, spawn_pool, terminate_workers, worker_settings
from taemi.run import experiment_folder, has_run, read_metrics

log = logging.getLogger(__name__)

DEFAULT_STUDY = "taemi-sweep"
#: A running trial records a heartbeat this often (seconds) ...
HEARTBEAT_SECONDS = 10
#: ... and one whose last heartbeat is older than this is taken as left by a dead process.
GRACE_SECONDS = 60
#: A process with no trial to start (the others are running the last ones) looks again this often.
POLL_SECONDS = 2.0
_LISTED = 5


# --------------------------------------------------------------------------- objectives


@dataclass
class ValidObjective:
    """One run per trial; the value is its best validation mean Pearson. Prunable: each
    epoch's validation mean Pearson is reported to the trial."""

    store: str
    train: Labels
    valid: Labels

    def record(self) -> dict:
        return {"kind": "valid", "value": "best validation mean Pearson of the trial's run"}

    def run(self, trial, cfg: RunConfig, run: Path, progress: bool) -> float:
        optuna = import_optuna()
        from taemi.train import trainer

        metrics = read_metrics(run) or {}
        if metrics.get("finished"):  # the run finished but its process did not tell the study
            log.info("trial %d: %s finished earlier, its score is reused", trial.number, run)
            return float(metrics["valid"]["mean_pearson"])
        resume = has_run(run)
        if resume:  # the epochs already run count for the pruner as if run now
            history = _history(run)
            for row in history:
                trial.report(float(row["valid_mean_pearson"]), int(row["epoch"]))
            if history and trial.should_prune():
                raise optuna.TrialPruned(
                    f"epoch {history[-1]['epoch']} (run before the interruption): below the "
                    "median of the finished trials at that epoch"
                )
            log.info("trial %d: resuming the interrupted run in %s", trial.number, run)

        def report(epoch: int, row: dict) -> None:
            trial.report(float(row["valid_mean_pearson"]), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"epoch {epoch}: valid mean Pearson {row['valid_mean_pearson']:.4f} is below "
                    "the median of the finished trials at that epoch"
                )

        trainer.train(
            cfg,
            self.store,
            self.train,
            self.valid,
            run,
            resume=resume,
            progress=progress,
            callbacks=[report],
        )
        return float((read_metrics(run) or {})["valid"]["mean_pearson"])

    def info(self, run: Path) -> dict:
        """What trials.csv shows of the trial's run besides its value."""
        m = read_metrics(run) or {}
        return {"best_epoch": m.get("best_epoch"), "epochs_run": m.get("epochs_run")}


def _history(run: Path) -> list[dict]:
    from taemi.run import HISTORY_FILE

    path = run / HISTORY_FILE
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@dataclass
class CvObjective:
    """k-fold cross-validation per trial (:func:`taemi.experiments.cv.run_cv`); the value
    is the pooled out-of-fold mean Pearson. Not pruned."""

    store: str
    train_csv: str
    valid_csv: str
    folds: int
    fold_seed: int
    group_by: str | None

    def record(self) -> dict:
        return {
            "kind": "cv",
            "folds": self.folds,
            "fold_seed": self.fold_seed,
            "group_by": self.group_by,
            "value": "pooled out-of-fold mean Pearson of the trial's cross-validation",
        }

    def run(self, trial, cfg: RunConfig, run: Path, progress: bool) -> float:
        from taemi.experiments.cv import run_cv

        if (run / "cv.json").is_file() or any(run.glob("fold_*")):
            log.info("trial %d: resuming the cross-validation in %s", trial.number, run)
        record = run_cv(
            self.store,
            self.train_csv,
            self.valid_csv,
            run,
            folds=self.folds,
            seed=self.fold_seed,
            group_by=self.group_by,
            overrides=list(flat_dict(cfg.to_dict()).items()),  # every key: exactly cfg
            progress=progress,
        )
        return float(record["pooled"]["mean_pearson"])

    def info(self, run: Path) -> dict:
        from taemi.experiments.cv import CV_JSON

        path = run / CV_JSON
        if not path.is_file():
            return {"fold_mean": None, "fold_std": None}
        record = json.loads(path.read_text(encoding="utf-8"))
        return {
            "fold_mean": record["fold_mean"]["mean_pearson"],
            "fold_std": record["fold_std"]["mean_pearson"],
        }


Objective = ValidObjective | CvObjective


# --------------------------------------------------------------------------- the folder and the study


def _differences(old: dict, new: dict) -> list[str]:
    a, b = flat_dict(json.loads(json.dumps(old))), flat_dict(json.loads(json.dumps(new)))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys[:_LISTED]]


def _check_or_write_folder(out: Path, base: RunConfig, space: Sequence[Param]) -> None:
    """Write ``base_config.yaml`` and ``space.yaml``; on a rerun they must hold the same."""
    import yaml

    space_record = {p.key: p.record() for p in space}
    cfg_path, space_path = out / BASE_CONFIG, out / SPACE_FILE
    if cfg_path.is_file():
        diff = _differences(load_config(cfg_path).to_dict(), base.to_dict())
        if diff:
            raise ValueError(
                f"{cfg_path} holds the base config of an earlier sweep in this folder, which "
                f"differs ({'; '.join(diff)}): rerun with its settings (e.g. --config {cfg_path}) "
                "or choose another --out"
            )
    if space_path.is_file():
        old = yaml.safe_load(space_path.read_text(encoding="utf-8")) or {}
        diff = _differences(old, space_record)
        if diff or list(old) != list(space_record):
            raise ValueError(
                f"{space_path} holds the space of an earlier sweep in this folder, which differs "
                f"({'; '.join(diff) or 'the order of the entries'}): rerun with --space {space_path} "
                "or choose another --out"
            )
    if not cfg_path.is_file():
        save_config(base, cfg_path)
    if not space_path.is_file():
        space_path.write_text(yaml.safe_dump(space_record, sort_keys=False), encoding="utf-8")


def _check_study(study, setup: dict, where: str) -> None:
    """The study records the sweep's setup when first used; a rerun must match it."""
    optuna = import_optuna()
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"{where} is not a study to maximise ({study.direction.name})")
    old = study.user_attrs.get(SETUP_ATTR)
    if old is None:
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            raise ValueError(
                f"{where} holds trials of another search (not made by taemi sweep); "
                "give another --study-name or --storage"
            )
        study.set_user_attr(SETUP_ATTR, json.loads(json.dumps(setup)))
        return
    diff = _differences(old, setup)
    if diff:
        raise ValueError(
            f"{where} was made with another space, base config or objective ({'; '.join(diff)}); "
            "rerun with its settings, or give another --study-name or --storage"
        )


def _storage(url: str):
    """An RDB storage with heartbeats (a trial of a dead process is detected)."""
    optuna = import_optuna()
    kw: dict = {}
    if url.startswith("sqlite"):  # the --jobs processes wait for each other's writes
        kw["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS, **kw
        )


def _shown_url(url: str) -> str:
    """The storage URL with any password hidden (it goes into logs and sweep.json)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _pruner(kind: str, startup: int, warmup: int):
    optuna = import_optuna()
    if kind == "none":
        return optuna.pruners.NopPruner()
    # epochs are steps 1, 2, ...: the earliest a trial can be pruned is at step warmup + 1
    return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup + 1)


class _SweepLock:
    """``OUT/.sweep.lock``, held (blocking) while a process does the study's bookkeeping."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> _SweepLock:  # noqa: PYI034
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self.fd is not None:
            fd, self.fd = self.fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every :data:`HEARTBEAT_SECONDS` while it runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name=f"sweep-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _root(trial) -> int:
    return int(trial.user_attrs.get(RETRY_OF, trial.number))


def _to_retry(trials: Sequence) -> list:
    """Failed trials whose chain has no later trial: each needs one retry."""
    optuna = import_optuna()
    latest: dict[int, int] = {}
    for t in trials:
        latest[_root(t)] = max(latest.get(_root(t), -1), t.number)
    return [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.FAIL and latest[_root(t)] == t.number
    ]


_DONE, _WAIT = "done", "wait"


def _next_trial(study, storage, target: int, seed: int):
    """Under the sweep lock: the trial to run next (a retry, an enqueued trial or a new
    one), :data:`_WAIT` while the last trials run elsewhere, :data:`_DONE` at ``target``."""
    optuna = import_optuna()
    ts = optuna.trial.TrialState
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead process's RUNNING trials -> FAIL
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (ts.COMPLETE, ts.PRUNED) for t in trials)
    if finished >= target:
        return _DONE
    retry = _to_retry(trials)
    if retry:
        t = retry[0]
        log.info(
            "trial %d did not finish (%s): retrying its parameters, resuming %s",
            t.number,
            t.user_attrs.get("error", "its process stopped"),
            f"{TRIALS_DIR}/trial_{_root(t)}",
        )
        study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF: _root(t)})
    elif (
        not any(t.state == ts.WAITING for t in trials)
        and finished + sum(t.state == ts.RUNNING for t in trials) >= target
    ):
        return _WAIT  # no new trial: the running ones may still finish the study
    sampler_seed = (seed * 1_000_003 + len(trials)) % 2**32
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    with warnings.catch_warnings():  # the heartbeat is kept by _heartbeat, not by optimize()
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        trial = study.ask()
    storage.record_heartbeat(trial._trial_id)  # before the lock is released: never unowned
    return trial


def _run_trial(study, storage, trial, job: dict) -> None:
    """Run one trial and tell the study how it ended; Ctrl-C or an error: FAIL, re-raised."""
    optuna = import_optuna()
    from taemi.train.trainer import TrainingError

    ts = optuna.trial.TrialState
    out: Path = job["out"]
    objective: Objective = job["objective"]
    root = _root(trial)
    run = trial_dir(out, root)
    t0 = time.perf_counter()
    trial.set_user_attr(RUN_ATTR, run.relative_to(out).as_posix())
    note = ""
    with _heartbeat(storage, trial._trial_id):
        try:
            params = {p.key: p.suggest(trial) for p in job["space"]}
            cfg = apply_params(job["base"], params)
            value = objective.run(trial, cfg, run, job["progress"])
            state = ts.COMPLETE
            if not math.isfinite(value):
                state, note = ts.PRUNED, f"non-finite value {value!r}"
        except optuna.TrialPruned as e:
            state, value, note = ts.PRUNED, None, str(e)
        except TrainingError as e:
            state, value, note = ts.PRUNED, None, f"diverged: {e}"
            trial.set_user_attr("diverged", " ".join(str(e).split())[:500])
        except BaseException as e:
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):  # the original error matters more
                trial.set_user_attr("error", " ".join(what.split())[:500])
                trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
                trial.set_user_attr("info", objective.info(run))
            study.tell(trial, state=ts.FAIL)
            log.warning(
                "trial %d stopped (%s); a rerun retries it with the same parameters",
                trial.number,
                what,
            )
            raise
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
        trial.set_user_attr("info", objective.info(run))
        if note:
            trial.set_user_attr("note", note)
        study.tell(trial, value if state == ts.COMPLETE else None, state=state)
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (ts.COMPLETE, ts.PRUNED) for t in trials)
    complete = [t for t in trials if t.state == ts.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    log.info(
        "trial %d %s%s; best so far %s; %d of %d trials finished",
        trial.number,
        state.name.lower(),
        f": value {value:.4f}" if state == ts.COMPLETE else f" ({note})",
        f"{best.value:.4f} (trial {best.number})" if best else "none",
        finished,
        job["trials"],
    )


def _work(job: dict) -> int:
    """Ask the study for trials and run them until it holds ``trials`` finished ones; in
    this process or a worker process. Returns the number of trials this process ran."""
    setup_worker(job["worker"])  # a worker process: the parent's log level, its cores
    optuna = import_optuna()
    _quiet_optuna()
    from taemi.signals import sigterm_raises

    storage = _storage(job["storage"])
    study = optuna.load_study(
        study_name=job["study_name"],
        storage=storage,
        pruner=_pruner(job["pruner"], job["prune_startup"], job["prune_warmup"]),
    )
    ran, waiting = 0, False
    with sigterm_raises():  # a worker stopped by its parent tells the study, as after Ctrl-C
        while True:
            with _SweepLock(job["out"]):
                trial = _next_trial(study, storage, job["trials"], job["seed"])
            if trial is _DONE:
                return ran
            if trial is _WAIT:
                if not waiting:
                    log.info("waiting for the last running trial(s) of other processes")
                waiting = True
                time.sleep(POLL_SECONDS)
                continue
            waiting = False
            _run_trial(study, storage, trial, job)
            ran += 1


def _run_workers(job: dict, jobs: int) -> None:
    """``jobs`` processes asking the study for trials (this one when ``jobs == 1``)."""
    if jobs == 1:
        _work({**job, "worker": None})
        return
    from concurrent.futures import FIRST_EXCEPTION, wait

    worker = worker_settings(jobs)
    pool = spawn_pool(jobs)
    try:
        futures = [
            pool.submit(_work, {**job, "progress": False, "worker": worker}) for _ in range(jobs)
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in done:
            fut.result()  # a worker's error stops the sweep
        for fut in futures:
            fut.result()
    except BaseException:
        # an error, Ctrl-C or SIGTERM: stop the other workers too (SIGTERM, which they turn
        # into a FAIL of their trial and the trainer's clean-up, so a rerun resumes them)
        terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _quiet_optuna() -> None:
    """Optuna's log lines go through ``logging`` (the command's format), warnings only:
    the sweep logs its own line per trial."""
    optuna = import_optuna()
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------- the command's work


def _whole(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} {value!r}: must be a whole number >= {low}")


def run_sweep(
    store: str | os.PathLike,
    train_csv: str | os.PathLike,
    valid_csv: str | os.PathLike,
    out: str | os.PathLike,
    space_file: str | os.PathLike,
    trials: int,
    *,
    jobs: int = 1,
    preset: str = "paper",
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[tuple[str, str]] = (),
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    objective: str = "valid",
    folds: int = 5,
    fold_seed: int = 0,
    group_by: str | None = None,
    pruner: str = "median",
    prune_startup: int = 5,
    prune_warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Search ``space_file`` over the config of ``preset`` + ``config_file`` +
    ``overrides`` until the study holds ``trials`` finished trials; returns the record
    written to ``OUT/sweep.json``. See the module docstring for the folder, the
    objectives and resumption. Everything that can be refused (the space, the config, the
    labels, a folder or study of another sweep) is checked before any training."""
    optuna = import_optuna()
    from taemi.store import FeatureStore
    from taemi.train.modes import config_for_store

    _whole("--trials", trials, 1)
    _whole("--jobs", jobs, 1)
    _whole("--prune-startup", prune_startup, 0)
    _whole("--prune-warmup", prune_warmup, 0)
    _whole("--seed", seed, 0)
    if objective not in ("valid", "cv"):
        raise ValueError(f"--objective {objective!r}: expected valid or cv")
    if pruner not in ("median", "none"):
        raise ValueError(f"--pruner {pruner!r}: expected median or none")
    if not study_name.strip():
        raise ValueError("--study-name is empty")
    out = experiment_folder(out)
    fs = FeatureStore(store)
    base = config_for_store(preset, list(overrides), fs, config_file)
    space = read_space(space_file, base)
    if objective == "cv":
        _whole("--folds", folds, 2)
        _whole("--fold-seed", fold_seed, 0)
        obj: Objective = CvObjective(
            str(fs.root), str(train_csv), str(valid_csv), folds, fold_seed, group_by
        )
    else:
        if group_by is not None:
            raise ValueError("--group-by applies to --objective cv only")
        kw = {"emotions": base.data.emotions, "id_column": base.data.id_column, "store_ids": fs}
        obj = ValidObjective(
            str(fs.root), read_labels(train_csv, **kw), read_labels(valid_csv, **kw)
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
    _check_or_write_folder(out, base, space)

    url = storage or f"sqlite:///{(out / STUDY_DB).resolve()}"
    _quiet_optuna()
    rdb = _storage(url)
    study = optuna.create_study(
        storage=rdb, study_name=study_name, direction="maximize", load_if_exists=True
    )
    setup = {
        "space": {p.key: p.record() for p in space},
        "base_config": base.to_dict(),
        "objective": obj.record(),
    }
    where = f"study {study_name!r} in {_shown_url(url)}"
    _check_study(study, setup, where)
    ts = optuna.trial.TrialState
    before = study.get_trials(deepcopy=False)
    finished = sum(t.state in (ts.COMPLETE, ts.PRUNED) for t in before)
    log.info(
        "sweep: %s, %d parameter(s), objective %s; %d of %d trials finished%s",
        where,
        len(space),
        objective,
        finished,
        trials,
        f", {len(_to_retry(before))} to retry" if _to_retry(before) else "",
    )
    pruner_text = (
        "none"
        if pruner == "none" or objective == "cv"
        else f"median (after {prune_startup} complete trials, from epoch {prune_warmup + 1})"
    )
    job = {
        "out": out,
        "storage": url,
        "study_name": study_name,
        "trials": trials,
        "seed": seed,
        "space": space,
        "base": base,
        "objective": obj,
        "pruner": "none" if objective == "cv" else pruner,
        "prune_startup": prune_startup,
        "prune_warmup": prune_warmup,
        "progress": progress,
    }
    _run_workers(job, jobs)

    meta = {
        "study": study_name,
        "storage": _shown_url(url),
        "direction": "maximize",
        "objective": obj.record(),
        "space": setup["space"],
        "trials": trials,
        "pruner": pruner_text,
        "seed": seed,
        "inputs": {
            "store": str(store),
            "train": str(train_csv),
            "valid": str(valid_csv),
            "space": str(space_file),
        },
    }
    study = optuna.load_study(study_name=study_name, storage=rdb)  # what every process told
    record = write_outputs(out, study, base, space, meta)
    best = record["best"]
    log.info(
        "sweep: %d of %d trials finished; best %s",
        record["finished"],
        trials,
        "none" if best is None else f"trial {best['number']}: {best['value']:.4f}",
    )
    return record
