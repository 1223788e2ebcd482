"""k-fold cross-validation over the train and valid splits pooled (``taemi cv``).

The clips of the two label files are pooled and cut into ``k`` folds; fold ``j``'s run
trains with the normal recipe (:func:`taemi.train.trainer.train`) on the other folds and
validates (early stopping, selection of the best epoch) on fold ``j``. Every clip is in
exactly one validation fold, so the best weights of the fold that held it out give one
out-of-fold (OOF) prediction per clip, computed through the one inference path
(:class:`taemi.inference.Predictor`). The score of the whole is reported two ways: per
fold (then mean and sample standard deviation over folds) and pooled (the challenge
metric over all OOF predictions at once).

Folds (:func:`make_folds`) depend only on the ids, ``k``, the seed and the groups, not on
the order of the rows:

- without groups, the sorted ids are permuted by ``numpy.random.default_rng(seed)`` and
  dealt round-robin, so fold sizes differ by at most one;
- with groups (a speaker, a source video: clips that must not be split between training
  and validation), whole groups are assigned greedily, largest first, each to the fold
  with the fewest clips so far (ties between groups of one size broken in a seeded random
  order, ties between folds by the lower fold number). This is the LPT rule: fold sizes
  differ by at most the size of the largest group. Fewer groups than folds is refused.

The output folder (see :func:`run_cv`) is resumable: a fold whose ``metrics.json`` says
it finished is reused, an interrupted one is resumed (``--resume`` semantics of the
trainer: exact at epoch granularity), and a rerun with other settings or other folds is
refused before any training, since its folds would not describe one experiment.

Parallel folds (``jobs > 1``) run in ``spawn``-started processes: forking a process whose
torch (OpenMP) thread pool has already run is not safe, and spawning costs one import of
torch per worker. Each worker gets an equal share of the cores for its torch threads
(unless ``OMP_NUM_THREADS`` is set).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import replace
from pathlib import Path

import numpy as np

from taemi.config import RunConfig, flat_dict, load_config, save_config
from taemi.data.labels import Labels, concat_labels, read_labels, write_predictions
from taemi.eval.metrics import Metrics, compute_metrics
from taemi.experiments.workers import setup_worker, spawn_pool, terminate_workers, worker_settings
from taemi.run import CONFIG_FILE, experiment_folder, has_run, read_metrics

log = logging.getLogger(__name__)

#: Files of a cross-validation folder (besides ``config.yaml`` and the ``fold_<j>/`` runs).
CV_JSON = "cv.json"
CV_CSV = "cv.csv"
CV_PLOT = "cv.png"
FOLDS_FILE = "folds.csv"
OOF_FILE = "oof_predictions.csv"
POOLED_LABELS_FILE = "pooled_labels.csv"
#: The group column of a ``--group-by FILE`` (beside the id column, ``data.id_column``).
GROUP_COLUMN = "group"
_LISTED = 5


def fold_dir(out: str | os.PathLike, fold: int) -> Path:
    """``OUT/fold_<fold>``: the run folder of fold ``fold`` (0-based)."""
    return Path(out) / f"fold_{fold}"


# --------------------------------------------------------------------------- folds


def make_folds(
    ids: Sequence[str], k: int, seed: int, groups: Sequence[str] | None = None
) -> list[list[str]]:
    """Split ``ids`` into ``k`` validation folds; ``folds[j]`` lists fold ``j``'s ids in
    the order given. ``groups`` (one group name per id, aligned with ``ids``) keeps every
    group inside one fold. See the module docstring for the rules.

    Raises ValueError for ``k < 2``, a negative seed, repeated ids, fewer ids than
    folds, ``groups`` of another length, or fewer groups than folds (naming both
    numbers)."""
    ids = list(ids)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the fold seed (--seed) must be a whole number >= 0, got {seed!r}")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"make_folds: ids repeated: {dup[:_LISTED]}")
    if len(ids) < k:
        raise ValueError(f"{len(ids)} clips cannot fill {k} folds; lower --folds")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    if groups is None:
        order = sorted(ids)  # the folds do not depend on the order of the rows
        for pos, idx in enumerate(rng.permutation(len(order))):
            fold_of[order[idx]] = pos % k
    else:
        groups = list(groups)
        if len(groups) != len(ids):
            raise ValueError(f"make_folds: {len(groups)} groups for {len(ids)} ids")
        members: dict[str, list[str]] = {}
        for clip_id, g in zip(ids, groups):
            members.setdefault(g, []).append(clip_id)
        if len(members) < k:
            raise ValueError(
                f"{len(members)} groups ({len(ids)} clips) cannot fill {k} folds: grouped "
                f"k-fold needs at least as many groups as folds; lower --folds to "
                f"{len(members)} or less, or group more finely"
            )
        names = sorted(members)
        shuffled = [names[i] for i in rng.permutation(len(names))]
        shuffled.sort(key=lambda g: -len(members[g]))  # stable: equal sizes stay shuffled
        sizes = [0] * k
        for g in shuffled:
            j = min(range(k), key=lambda f: (sizes[f], f))
            sizes[j] += len(members[g])
            for clip_id in members[g]:
                fold_of[clip_id] = j
    return [[i for i in ids if fold_of[i] == j] for j in range(k)]


def _read_column(path: Path, id_column: str, column: str, flag: str) -> dict[str, str]:
    """``{id: value of column}`` of a CSV file; ValueError naming the file (and line) for a
    missing column, a row of the wrong length, an empty value or a repeated id."""
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None) or []
            for col in (id_column, column):
                if col not in header:
                    raise ValueError(f"{flag}: {path} has no column {col!r} (header: {header})")
            i, j = header.index(id_column), header.index(column)
            for row in reader:
                if not row:
                    continue
                where = f"{flag}: {path} line {reader.line_num}"
                if len(row) != len(header):
                    raise ValueError(f"{where}: {len(row)} fields, the header has {len(header)}")
                if row[j].strip() == "":
                    raise ValueError(f"{where}: id {row[i]!r} has an empty {column!r}")
                if row[i] in out:
                    raise ValueError(f"{where}: id {row[i]!r} is listed twice")
                out[row[i]] = row[j]
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}: {path} is not valid UTF-8 ({e})") from None
    except csv.Error as e:
        raise ValueError(f"{flag}: {path} is not a valid CSV file ({e})") from None
    return out


def read_groups(
    group_by: str,
    label_files: Sequence[str | os.PathLike],
    ids: Sequence[str],
    id_column: str = "Filename",
) -> list[str]:
    """The group of each of ``ids`` (aligned with them), from ``group_by``:

    - an existing file: a CSV with the id column (``id_column``) and a ``group`` column
      (it may list other clips too, e.g. a corpus' speaker table);
    - otherwise the name of a column of every file in ``label_files`` (read_labels
      ignores columns other than the emotions, so label files may carry it).

    ValueError naming the file for a missing column, an empty group, or clips without one."""
    flag = f"--group-by {group_by}"
    path = Path(group_by)
    table: dict[str, str] = {}
    if path.is_file():
        table = _read_column(path, id_column, GROUP_COLUMN, flag)
        source = str(path)
    else:
        for f in label_files:
            try:
                table.update(_read_column(Path(f), id_column, group_by, flag))
            except ValueError as e:
                raise ValueError(f"{e} (the value is not a file, so it names a column)") from None
        source = " + ".join(map(str, label_files))
    missing = [i for i in ids if i not in table]
    if missing:
        raise ValueError(
            f"{flag}: {len(missing)} of {len(ids)} clip(s) have no group in {source}: "
            f"{missing[:_LISTED]}"
        )
    return [table[i] for i in ids]


# --------------------------------------------------------------------------- the folder


def _check_or_write_config(out: Path, cfg: RunConfig) -> None:
    """Write ``OUT/config.yaml``; when one is there (a rerun), it must hold ``cfg``."""
    path = out / CONFIG_FILE
    if not path.is_file():
        save_config(cfg, path)
        return
    old, new = flat_dict(load_config(path).to_dict()), flat_dict(cfg.to_dict())
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:_LISTED])
        raise ValueError(
            f"{path} holds the config of an earlier cross-validation in this folder, which "
            f"differs ({shown}): rerun with its settings (e.g. --config {path}) or choose "
            "another --out"
        )


def _fold_rows(pooled: Labels, folds: list[list[str]], groups: list[str] | None) -> list[list]:
    group_of = dict(zip(pooled.ids, groups)) if groups is not None else {}
    fold_of = {i: j for j, ids in enumerate(folds) for i in ids}
    return [[i, fold_of[i], group_of.get(i, "")] for i in sorted(pooled.ids)]


def _check_or_write_folds(out: Path, rows: list[list], id_column: str) -> None:
    """Write ``OUT/folds.csv`` (id, fold, group; sorted by id); when one is there (a
    rerun), it must assign every clip as ``rows`` do."""
    path = out / FOLDS_FILE
    text = [[id_column, "fold", "group"], *[[i, str(f), g] for i, f, g in rows]]
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            old = [r for r in csv.reader(fh) if r]
        if old != text:
            before = {r[0]: r[1:] for r in old[1:] if r}
            now = {r[0]: r[1:] for r in text[1:]}
            changed = sorted(i for i in before.keys() | now.keys() if before.get(i) != now.get(i))
            raise ValueError(
                f"{path} assigns the clips to folds differently ({len(changed)} clip(s) differ, "
                f"e.g. {changed[:_LISTED]}): --folds, --seed, --group-by or the label files "
                "changed since the folds there were made; rerun with those or choose another --out"
            )
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- training the folds


def _train_fold(job: dict) -> dict:
    """Train (or resume) one fold's run; in this process or a worker process."""
    setup_worker(job["worker"])  # a worker process: the parent's log level, its cores
    from taemi.signals import sigterm_raises
    from taemi.train.trainer import train

    with sigterm_raises():  # a worker stopped by its parent cleans up as after Ctrl-C
        res = train(
            job["cfg"],
            job["store"],
            job["train"],
            job["valid"],
            job["run"],
            resume=job["resume"],
            progress=job["progress"],
        )
    return {"fold": job["fold"], "best_epoch": res.best_epoch}


def _train_folds(todo: list[dict], jobs: int, k: int) -> None:
    """Train the folds of ``todo``, ``jobs`` at a time; a line per finished fold."""
    done = k - len(todo)

    def finished(job: dict) -> None:
        nonlocal done
        done += 1
        m = read_metrics(job["run"]) or {}
        log.info(
            "fold %d finished (%d of %d folds done): best epoch %s, valid mean Pearson %.4f",
            job["fold"],
            done,
            k,
            m.get("best_epoch"),
            (m.get("valid") or {}).get("mean_pearson", math.nan),
        )

    if jobs == 1 or len(todo) == 1:
        for job in todo:
            _train_fold(job)
            finished(job)
        return
    workers = min(jobs, len(todo))
    worker = worker_settings(workers)
    pool = spawn_pool(workers)
    pending, running = list(todo), {}  # running: future -> job
    try:
        while pending or running:
            # at most one fold per worker is submitted: the pool queues nothing that an
            # interruption would have to wait for
            while pending and len(running) < workers:
                job = pending.pop(0)
                fut = pool.submit(_train_fold, {**job, "progress": False, "worker": worker})
                running[fut] = job
            done_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in sorted(done_now, key=lambda f: running[f]["fold"]):
                job = running.pop(fut)
                fut.result()  # a fold's error stops the cross-validation
                finished(job)
    except BaseException:
        # an error, Ctrl-C or SIGTERM: stop the folds in progress too (SIGTERM, which the
        # workers turn into the trainer's clean-up, so their run folders stay resumable)
        terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- scores


def _oof_predictions(
    out: Path, store, cfg: RunConfig, fold_labels: list[Labels], progress: bool
) -> list[np.ndarray]:
    """Each fold's raw predictions (n_j, E) on its validation clips, from its best
    weights, on ``train.device`` in the precision the fold validated in."""
    from taemi.inference import Predictor
    from taemi.runtime import resolve_device, resolve_precision

    device = resolve_device(cfg.train.device)
    preds = []
    for j, labels in enumerate(fold_labels):
        run = fold_dir(out, j)
        precision = resolve_precision((read_metrics(run) or {}).get("precision", "fp32"), device)
        predictor = Predictor.from_run(run, "best", device=device, precision=precision)
        predictor.check_store(store)
        dataset = predictor.dataset(store, labels)
        preds.append(
            predictor.predict(
                dataset,
                progress=progress,
                desc=f"fold {j} out-of-fold",
                check=f"fold {j} ({run}) on its validation clips",
            )
        )
    return preds


def _summary_of(metrics: list[Metrics], stat) -> dict:
    """``stat`` (mean or stdev) over folds of each score."""
    emotions = list(metrics[0].pearson)
    return {
        "mean_pearson": stat([m.mean_pearson for m in metrics]),
        "mean_ccc": stat([m.mean_ccc for m in metrics]),
        "mse": stat([m.mse for m in metrics]),
        "pearson": {e: stat([m.pearson[e] for m in metrics]) for e in emotions},
        "ccc": {e: stat([m.ccc[e] for m in metrics]) for e in emotions},
    }


def _csv_row(name: str, clips, best_epoch, scores: dict) -> dict:
    return {
        "fold": name,
        "valid_clips": clips,
        "best_epoch": best_epoch,
        "mean_pearson": scores["mean_pearson"],
        "mean_ccc": scores["mean_ccc"],
        "mse": scores["mse"],
        **{f"pearson_{e}": v for e, v in scores["pearson"].items()},
        **{f"ccc_{e}": v for e, v in scores["ccc"].items()},
    }


def _write_table(out: Path, record: dict) -> None:
    """``OUT/cv.csv``: one row per fold, then the mean, std and pooled rows."""
    rows = [
        _csv_row(str(f["fold"]), f["valid_clips"], f["best_epoch"], f["valid"])
        for f in record["per_fold"]
    ]
    rows += [
        _csv_row("mean", "", "", record["fold_mean"]),
        _csv_row("std", "", "", record["fold_std"]),
        _csv_row("pooled", record["clips"], "", record["pooled"]),
    ]
    tmp = out / f".{CV_CSV}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / CV_CSV)


def _plot(out: Path, record: dict) -> None:
    """``OUT/cv.png``: per-fold mean Pearson beside the fold mean and the pooled score;
    per-emotion Pearson, pooled and fold mean +- std."""
    from taemi.train.plots import pyplot

    plt = pyplot()
    folds = record["per_fold"]
    emotions = record["emotions"]
    fig, (ax1, ax2) = plt.subplots(
        1,
        2,
        figsize=(4 + 0.6 * len(folds) + 1.3 * len(emotions), 4.2),
        gridspec_kw={"width_ratios": [max(len(folds), 2), len(emotions)]},
    )
    ax1.bar(range(len(folds)), [f["valid"]["mean_pearson"] for f in folds], color="C0")
    ax1.axhline(
        record["fold_mean"]["mean_pearson"],
        color="C1",
        ls="--",
        label=f"fold mean {record['fold_mean']['mean_pearson']:.3f} "
        f"(std {record['fold_std']['mean_pearson']:.3f})",
    )
    ax1.axhline(
        record["pooled"]["mean_pearson"],
        color="C3",
        label=f"pooled OOF {record['pooled']['mean_pearson']:.3f}",
    )
    ax1.set_xticks(range(len(folds)), [str(f["fold"]) for f in folds])
    ax1.set_xlabel("fold")
    ax1.set_ylabel("valid mean Pearson r")
    ax1.set_title(f"{record['folds']}-fold cross-validation")
    ax1.legend(fontsize=8)
    x = np.arange(len(emotions))
    ax2.bar(
        x - 0.2,
        [record["pooled"]["pearson"][e] for e in emotions],
        0.4,
        label="pooled OOF",
        color="C3",
    )
    ax2.bar(
        x + 0.2,
        [record["fold_mean"]["pearson"][e] for e in emotions],
        0.4,
        yerr=[record["fold_std"]["pearson"][e] for e in emotions],
        capsize=3,
        label="fold mean +- std",
        color="C1",
    )
    ax2.set_xticks(x, emotions, rotation=30, ha="right")
    ax2.set_ylabel("Pearson r")
    ax2.set_title("per emotion")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = out / f".{CV_PLOT}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out / CV_PLOT)


def format_cv(record: dict) -> str:
    """A cross-validation record (``cv.json``) as text: the folds with their mean, std and
    pooled rows, then Pearson per emotion (pooled, fold mean, fold std)."""
    grouping = (
        f", grouped by {record['group_by']} ({record['groups']} groups)"
        if record.get("group_by")
        else ""
    )
    lines = [
        (
            f"{record['folds']}-fold cross-validation over {record['clips']} clips "
            f"(seed {record['seed']}{grouping}); raw predictions"
        ),
        f"{'fold':<8}{'clips':>7}{'best epoch':>12}{'mean Pearson':>14}{'mean CCC':>10}{'MSE':>10}",
    ]

    def row(name, clips, epoch, s) -> str:
        return (
            f"{name:<8}{clips!s:>7}{epoch!s:>12}{s['mean_pearson']:>14.4f}"
            f"{s['mean_ccc']:>10.4f}{s['mse']:>10.5f}"
        )

    lines += [
        row(f["fold"], f["valid_clips"], f["best_epoch"], f["valid"]) for f in record["per_fold"]
    ]
    lines += [
        row("mean", "", "", record["fold_mean"]),
        row("std", "", "", record["fold_std"]),
        row("pooled", record["clips"], "", record["pooled"]),
    ]
    width = max(len(e) for e in record["emotions"]) + 2
    lines += ["", f"{'emotion':<{width}}{'pooled':>9}{'fold mean':>11}{'fold std':>10}"]
    for e in record["emotions"]:
        lines.append(
            f"{e:<{width}}{record['pooled']['pearson'][e]:>9.4f}"
            f"{record['fold_mean']['pearson'][e]:>11.4f}{record['fold_std']['pearson'][e]:>10.4f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command's work


def run_cv(
    store: str | os.PathLike,
    train_csv: str | os.PathLike,
    valid_csv: str | os.PathLike,
    out: str | os.PathLike,
    *,
    folds: int = 5,
    seed: int = 0,
    group_by: str | None = None,
    preset: str = "paper",
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[tuple[str, str]] = (),
    jobs: int = 1,
    progress: bool = True,
) -> dict:
    """k-fold cross-validation of one config over ``train_csv`` + ``valid_csv``; returns
    the record written to ``OUT/cv.json``.

    Writes into ``out``: ``config.yaml`` (the resolved config every fold trains with),
    ``folds.csv`` (id, fold, group; group empty without ``group_by``),
    ``pooled_labels.csv`` (the pooled labels, for ``taemi compare`` of two OOF files),
    ``fold_<j>/`` (fold ``j``'s run folder), ``oof_predictions.csv`` (raw, every clip once),
    ``cv.json``, ``cv.csv`` and ``cv.png``. ``seed`` decides the folds only (the runs use
    ``train.seed``); ``group_by``: see :func:`read_groups`; ``jobs``: folds trained in
    parallel processes. Everything that can be refused (config, labels, groups, fold
    sizes, a folder of another experiment) is checked before any training."""
    from taemi.store import FeatureStore
    from taemi.train.modes import config_for_store

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs {jobs!r}: must be a whole number >= 1")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"--folds {folds!r}: cross-validation needs at least 2 folds")
    out = experiment_folder(out)
    fs = FeatureStore(store)
    cfg = config_for_store(preset, list(overrides), fs, config_file)
    kw = {"emotions": cfg.data.emotions, "id_column": cfg.data.id_column, "store_ids": fs}
    pooled = concat_labels(read_labels(train_csv, **kw), read_labels(valid_csv, **kw))
    groups = (
        read_groups(group_by, [train_csv, valid_csv], pooled.ids, cfg.data.id_column)
        if group_by is not None
        else None
    )
    fold_ids = make_folds(pooled.ids, folds, seed, groups)
    small = [(j, len(ids)) for j, ids in enumerate(fold_ids) if len(ids) < 2]
    if small:
        raise ValueError(
            f"fold(s) {[j for j, _ in small]} would validate on fewer than 2 clips (fold sizes "
            f"{[len(ids) for ids in fold_ids]}); Pearson r needs at least 2: lower --folds"
            + (" or group more finely" if groups is not None else "")
        )
    # each split names its fold: the trainer takes equal sources for validating on the training set
    fold_labels = [
        replace(pooled.subset(ids), source=f"fold {j} of {pooled.source}")
        for j, ids in enumerate(fold_ids)
    ]

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
    _check_or_write_config(out, cfg)
    _check_or_write_folds(out, _fold_rows(pooled, fold_ids, groups), cfg.data.id_column)
    write_predictions(out / POOLED_LABELS_FILE, pooled.ids, cfg.data.emotions, pooled.values)

    todo = []
    for j, valid in enumerate(fold_labels):
        run = fold_dir(out, j)
        if (read_metrics(run) or {}).get("finished"):
            log.info("fold %d: finished earlier in %s, reused", j, run)
            continue
        resume = has_run(run)
        if resume:
            log.info("fold %d: resuming the interrupted run in %s", j, run)
        held_out = set(valid.ids)
        train = replace(
            pooled.subset([i for i in pooled.ids if i not in held_out]),
            source=f"folds other than {j} of {pooled.source}",
        )
        todo.append(
            {
                "fold": j,
                "cfg": cfg,
                "store": str(fs.root),
                "train": train,
                "valid": valid,
                "run": str(run),
                "resume": resume,
                "progress": progress,
                "worker": None,  # set for a worker process (jobs > 1)
            }
        )
    log.info(
        "cross-validation: %d folds over %d clips (%s + %s)%s; %d finished, %d to train",
        folds,
        len(pooled),
        train_csv,
        valid_csv,
        f", {len(set(groups))} groups by {group_by}" if groups is not None else "",
        folds - len(todo),
        len(todo),
    )
    _train_folds(todo, jobs, folds)

    preds = _oof_predictions(out, fs, cfg, fold_labels, progress)
    emotions = cfg.data.emotions
    per_fold, fold_metrics = [], []
    for j, (labels, pred) in enumerate(zip(fold_labels, preds)):
        m = compute_metrics(pred, labels.values, emotions)
        run_metrics = read_metrics(fold_dir(out, j)) or {}
        fold_metrics.append(m)
        per_fold.append(
            {
                "fold": j,
                "run": fold_dir(out, j).name,
                "train_clips": len(pooled) - len(labels),
                "valid_clips": len(labels),
                "best_epoch": run_metrics.get("best_epoch"),
                "epochs_run": run_metrics.get("epochs_run"),
                "stopped_early": run_metrics.get("stopped_early"),
                "precision": run_metrics.get("precision"),
                "valid": m.to_dict(),
            }
        )
    oof = np.zeros((len(pooled), len(emotions)), dtype=np.float32)  # (N, E) in pooled order
    row_of = pooled.index()
    for labels, pred in zip(fold_labels, preds):
        oof[[row_of[i] for i in labels.ids]] = pred
    write_predictions(out / OOF_FILE, pooled.ids, emotions, oof, clip=False)
    record = {
        "folds": folds,
        "seed": seed,
        "group_by": group_by,
        "groups": None if groups is None else len(set(groups)),
        "clips": len(pooled),
        "emotions": list(emotions),
        "inputs": {"store": str(store), "train": str(train_csv), "valid": str(valid_csv)},
        "predictions": "raw (not clipped), from each fold's best weights",
        "std": "sample standard deviation over folds (n - 1)",
        "per_fold": per_fold,
        "fold_mean": _summary_of(fold_metrics, statistics.fmean),
        "fold_std": _summary_of(fold_metrics, statistics.stdev),
        "pooled": compute_metrics(oof, pooled.values, emotions).to_dict(),
    }
    tmp = out / f".{CV_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, out / CV_JSON)
    _write_table(out, record)
    _plot(out, record)
    log.info(
        "cross-validation: pooled OOF mean Pearson %.4f; fold mean %.4f +- %.4f",
        record["pooled"]["mean_pearson"],
        record["fold_mean"]["mean_pearson"],
        record["fold_std"]["mean_pearson"],
    )
    return record
