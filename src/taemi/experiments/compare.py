"""Is run A's validation score really different from run B's? A paired bootstrap over clips.

Each of A and B is a run folder (its ``valid_predictions.csv``: the raw validation
predictions of the best epoch, written by training) or a prediction CSV itself. Both
must cover the same clip ids and emotions; the targets come from the validation label
CSV. The test is :func:`taemi.eval.stats.paired_bootstrap`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taemi.data.labels import read_labels
from taemi.eval.metrics import Metrics, compute_metrics
from taemi.eval.stats import BootstrapResult, paired_bootstrap
from taemi.run import VALID_PREDICTIONS_FILE

_MAX_LISTED = 5


def predictions_path(run: str | os.PathLike) -> Path:
    """A run folder's ``valid_predictions.csv``, or ``run`` itself when it is a CSV file."""
    p = Path(run)
    if p.is_dir():
        f = p / VALID_PREDICTIONS_FILE
        if not f.is_file():
            raise FileNotFoundError(
                f"{p} has no {VALID_PREDICTIONS_FILE} (training writes it when it has a validation split)"
            )
        return f
    if p.is_file():
        return p
    raise FileNotFoundError(f"{p} is neither a run folder nor a prediction CSV")


def _listed(ids: list[str]) -> str:
    more = f" ... ({len(ids)} in all)" if len(ids) > _MAX_LISTED else ""
    return f"{ids[:_MAX_LISTED]}{more}"


def load_pair(run_a: str | os.PathLike, run_b: str | os.PathLike, labels: str | os.PathLike):
    """(path A, path B, predictions A, predictions B (N, E), target labels) aligned on A's ids
    and emotions, after the consistency checks."""
    path_a, path_b = predictions_path(run_a), predictions_path(run_b)
    pa = read_labels(path_a, emotions=None, value_range=None)
    pb = read_labels(path_b, emotions=None, value_range=None)
    if set(pa.emotions) != set(pb.emotions):
        raise ValueError(
            f"{path_a} has emotions {list(pa.emotions)} but {path_b} has {list(pb.emotions)}"
        )
    ids_a, ids_b = set(pa.ids), set(pb.ids)
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise ValueError(
            f"the prediction files cover different clips: {len(only_a)} id(s) only in {path_a}"
            f" {_listed(only_a)}, {len(only_b)} id(s) only in {path_b} {_listed(only_b)}"
        )
    target = read_labels(labels, emotions=pa.emotions)
    missing = sorted(ids_a - set(target.ids))
    if missing:
        raise ValueError(
            f"{len(missing)} predicted id(s) have no label in {labels}: {_listed(missing)}"
        )
    b_cols = [pb.emotions.index(e) for e in pa.emotions]
    b_rows = pb.index()
    pred_b = pb.values[[b_rows[i] for i in pa.ids]][:, b_cols]  # (N, E) in A's row/column order
    return path_a, path_b, pa, pred_b, target.subset(pa.ids)  # targets in A's order


@dataclass
class Comparison:
    path_a: Path
    path_b: Path
    emotions: tuple[str, ...]
    metrics_a: Metrics
    metrics_b: Metrics
    result: BootstrapResult


def compare_runs(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    clip: bool = False,
) -> Comparison:
    """Both runs' metrics and the paired bootstrap of mean Pearson A - B (``clip``: predictions
    clipped to [0, 1] first)."""
    path_a, path_b, pa, pred_b, target = load_pair(run_a, run_b, labels)
    a = pa.values.astype(np.float64)  # (N, E)
    b = pred_b.astype(np.float64)  # (N, E)
    if clip:
        a, b = np.clip(a, 0.0, 1.0), np.clip(b, 0.0, 1.0)
    t = target.values.astype(np.float64)  # (N, E)
    emotions = pa.emotions
    ma = compute_metrics(a, t, emotions, clipped=clip)
    mb = compute_metrics(b, t, emotions, clipped=clip)
    return Comparison(
        path_a, path_b, tuple(emotions), ma, mb, paired_bootstrap(a, b, t, n_boot=n_boot, seed=seed)
    )
