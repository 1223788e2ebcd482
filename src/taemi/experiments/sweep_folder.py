"""The folder of ``taemi sweep``: its file names, the trial attributes the sweep sets, and
what it writes after every run (``trials.csv``, ``best_config.yaml``, ``sweep.json`` and the
figures; see :mod:`taemi.experiments.sweep`)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from taemi.config import RunConfig, save_config
from taemi.experiments.sweep_space import Param, apply_params

log = logging.getLogger(__name__)

#: Files of a sweep folder (besides ``study.db`` and the ``trials/trial_<k>/`` folders).
SWEEP_JSON = "sweep.json"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
BASE_CONFIG = "base_config.yaml"
SPACE_FILE = "space.yaml"
STUDY_DB = "study.db"
TRIALS_DIR = "trials"
LOCK_FILE = ".sweep.lock"
OBJECTIVE_PLOT = "objective.png"
IMPORTANCE_PLOT = "importance.png"
PARALLEL_PLOT = "parallel.png"
PLOTS = (OBJECTIVE_PLOT, IMPORTANCE_PLOT, PARALLEL_PLOT)


#: Trial attributes the sweep sets.
RETRY_OF = "retry_of"  # the first trial of a retry chain, whose run folder the chain shares
RUN_ATTR = "run"  # the trial's folder, relative to OUT
SETUP_ATTR = "taemi.setup"  # study attribute: space, base config and objective


def trial_dir(out: str | os.PathLike, number: int) -> Path:
    """``OUT/trials/trial_<number>``: the run (or CV) folder of trial ``number``'s chain."""
    return Path(out) / TRIALS_DIR / f"trial_{number}"


def import_optuna():
    """The ``optuna`` module, or an ImportError saying how to install it."""
    try:
        import optuna
    except ImportError as e:
        raise ImportError(
            "taemi sweep needs Optuna: pip install 'taemi[sweep]' (or pip install 'optuna>=4,<6')"
        ) from e
    return optuna


def _trial_rows(trials: Sequence, space: Sequence[Param]) -> list[dict]:
    info_keys: list[str] = []
    for t in trials:
        for k in t.user_attrs.get("info") or {}:
            if k not in info_keys:
                info_keys.append(k)
    rows = []
    for t in trials:
        info = t.user_attrs.get("info") or {}
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": "" if t.value is None else t.value,
                **{p.key: t.params.get(p.key, "") for p in space},
                **{k: "" if info.get(k) is None else info[k] for k in info_keys},
                "seconds": t.user_attrs.get("seconds", ""),
                RETRY_OF: t.user_attrs.get(RETRY_OF, ""),
                RUN_ATTR: t.user_attrs.get(RUN_ATTR, ""),
                "note": t.user_attrs.get("note") or t.user_attrs.get("error", ""),
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _save_figure(fig, path: Path) -> None:
    from taemi.train.plots import pyplot

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    os.replace(tmp, path)


def _plot_objective(out: Path, trials: Sequence) -> None:
    """Value per trial (complete: dots, pruned: crosses at their last reported value) and
    the running best of the complete trials."""
    from taemi.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.value is not None]
    ax.scatter([t.number for t in done], [t.value for t in done], color="C0", label="complete")
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.value for t in pruned],
            color="C3",
            marker="x",
            label="pruned (last reported value)",
        )
    best, xs, ys = -math.inf, [], []
    for t in sorted(done, key=lambda t: t.number):
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (mean Pearson r)")
    ax.set_title(f"{len(trials)} trials")
    ax.legend(fontsize=8)
    _save_figure(fig, out / OBJECTIVE_PLOT)


def _plot_importance(out: Path, importances: dict[str, float]) -> None:
    from taemi.train.plots import pyplot

    plt = pyplot()
    names = list(importances)[::-1]  # the most important on top
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.set_title("parameter importance")
    _save_figure(fig, out / IMPORTANCE_PLOT)


def _plot_parallel(out: Path, trials: Sequence, space: Sequence[Param]) -> None:
    """A line per complete trial through one axis per parameter and the value (each axis
    from its range's low to high, log for a log range; choices evenly spaced), coloured by
    the value."""
    import matplotlib
    from matplotlib import cm, colors

    from taemi.train.plots import pyplot

    plt = pyplot()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    values = [t.value for t in done]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    norm = colors.Normalize(lo, hi if hi > lo else lo + 1.0)
    cmap = matplotlib.colormaps["viridis"]
    n_axes = len(space) + 1
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * n_axes), 4.2))
    for t in sorted(done, key=lambda t: t.value):  # the best drawn last, on top
        ys = [p.position(t.params[p.key]) for p in space] + [(t.value - lo) / span]
        ax.plot(range(n_axes), ys, color=cmap(norm(t.value)), alpha=0.8, marker="o", ms=3)
    for i in range(n_axes):
        ax.axvline(i, color="0.6", lw=0.8)
    labels = [p.axis_labels() for p in space] + [(f"{lo:.3f}", f"{hi:.3f}")]
    for i, (low, high) in enumerate(labels):
        ax.text(i, -0.06, low, ha="center", va="top", fontsize=7)
        ax.text(i, 1.06, high, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(n_axes), [p.key for p in space] + ["value"], fontsize=8)
    ax.set_ylim(-0.15, 1.15)
    ax.set_yticks([])
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="value")
    ax.set_title(f"parallel coordinates ({len(done)} complete trials)", pad=18)
    _save_figure(fig, out / PARALLEL_PLOT)


def write_outputs(out: Path, study, base: RunConfig, space: Sequence[Param], meta: dict) -> dict:
    """``trials.csv``, ``best_config.yaml``, the figures and ``sweep.json`` of the study as
    it is now; returns the record written to ``sweep.json``."""
    optuna = import_optuna()
    ts = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    if trials:
        _write_csv(out / TRIALS_CSV, _trial_rows(trials, space))
    complete = [t for t in trials if t.state == ts.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    notes = []
    if best is not None:
        save_config(apply_params(base, best.params), out / BEST_CONFIG)
    else:
        notes.append(f"no complete trial: no {BEST_CONFIG}")
    importances = None
    if trials:
        _plot_objective(out, trials)
    if len(complete) < 2 or len(space) < 2:
        notes.append(
            f"no {IMPORTANCE_PLOT}: parameter importance needs 2 complete trials and 2 "
            f"parameters ({len(complete)} and {len(space)} here)"
        )
    else:
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except ImportError as e:  # fANOVA's trees come from scikit-learn
            notes.append(f"no {IMPORTANCE_PLOT}: {e} (pip install 'taemi[sweep]')")
        except (RuntimeError, ValueError) as e:  # e.g. every trial got the same value
            notes.append(f"no {IMPORTANCE_PLOT}: {' '.join(str(e).split())}")
        else:
            _plot_importance(out, importances)
    if complete:
        _plot_parallel(out, trials, space)
    else:
        notes.append(f"no {PARALLEL_PLOT}: no complete trial")
    for note in notes:
        log.info("sweep: %s", note)
    counts = {s.name: sum(t.state == s for t in trials) for s in ts}
    record = {
        **meta,
        "counts": {k: v for k, v in counts.items() if v},
        "finished": counts["COMPLETE"] + counts["PRUNED"],
        "best": None
        if best is None
        else {
            "number": best.number,
            "value": best.value,
            "params": dict(best.params),
            "run": best.user_attrs.get(RUN_ATTR),
            "info": best.user_attrs.get("info"),
        },
        "importance": importances,
        "notes": notes,
    }
    tmp = out / f".{SWEEP_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, out / SWEEP_JSON)
    return record


def format_sweep(record: dict) -> str:
    """A sweep record (``sweep.json``) as text: counts, objective, the best trial."""
    counts = record.get("counts") or {}
    obj = record["objective"]
    how = (
        f"{obj['folds']}-fold cross-validation (fold seed {obj['fold_seed']}"
        + (f", grouped by {obj['group_by']}" if obj.get("group_by") else "")
        + ")"
        if obj["kind"] == "cv"
        else "one run per trial, selected on the validation labels"
    )
    lines = [
        f"Optuna study {record['study']!r} in {record['storage']}",
        f"{record['finished']} of {record['trials']} trials finished: "
        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()),
        f"objective: {obj['value']} ({how}); maximised",
        f"pruner: {record['pruner']}",
    ]
    best = record.get("best")
    if best is None:
        lines.append("best trial: none complete")
    else:
        lines.append(f"best trial {best['number']}: {best['value']:.4f} ({best['run']})")
        width = max(len(k) for k in best["params"]) if best["params"] else 0
        lines += [f"  {k:<{width}} = {v!r}" for k, v in best["params"].items()]
    if record.get("importance"):
        lines.append(
            "importance: " + ", ".join(f"{k} {v:.2f}" for k, v in record["importance"].items())
        )
    lines += [f"note: {n}" for n in record.get("notes") or []]
    return "\n".join(lines)
