"""Challenge metric and companions: per-emotion Pearson r, Lin's CCC, MSE.

ABAW EMI (docs/method.md section 1): Pearson's r per emotion over the WHOLE split, in float64,
and the score is the mean over emotions. A constant column has an undefined r; it is
reported as 0.0 with a ``RuntimeWarning`` naming the column. Whether predictions were
clipped to [0, 1] before scoring is recorded (docs/method.md section 8).

CCC: L. I. Lin, "A concordance correlation coefficient to evaluate reproducibility",
Biometrics 45(1), 1989 (population moments).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from taemi.numeric import require_finite

__all__ = ["Metrics", "ccc", "compute_metrics", "pearson"]


def _as_pair(pred: np.ndarray, target: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both as 1-D float64 arrays of equal length >= 2 without NaN/Inf."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{what}: expects 1-D arrays, got pred {x.shape} and target {y.shape}")
    if x.shape != y.shape:
        raise ValueError(f"{what}: pred has {x.shape[0]} values, target {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError(f"{what}: needs at least 2 values, got {x.shape[0]}")
    for name, a in (("pred", x), ("target", y)):
        require_finite(a, f"{what}: {name}")
    return x, y


def _label(name: str | None) -> str:
    return f" for {name!r}" if name else ""


def pearson(pred: np.ndarray, target: np.ndarray, *, name: str | None = None) -> float:
    """Pearson's r of two 1-D arrays, in float64.

    A constant ``pred`` or ``target`` makes r undefined: returns 0.0 and warns
    (``RuntimeWarning``) saying which side is constant. ``name`` (an emotion) is
    quoted in messages.
    """
    x, y = _as_pair(pred, target, f"pearson{_label(name)}")  # (N,), (N,)
    constant = [side for side, a in (("prediction", x), ("target", y)) if (a == a[0]).all()]
    if constant:
        warnings.warn(
            f"Pearson r{_label(name)} is undefined: the {' and '.join(constant)} column is constant "
            f"(value {x[0] if constant[0] == 'prediction' else y[0]!r} in all {x.shape[0]} rows); "
            "reporting 0.0",
            RuntimeWarning,
            stacklevel=2,
        )
        return 0.0
    xc = x - x.mean()
    yc = y - y.mean()
    # normalise each side first so the products cannot overflow for large values
    xc /= np.linalg.norm(xc)
    yc /= np.linalg.norm(yc)
    r = float(np.dot(xc, yc))
    return max(-1.0, min(1.0, r))


def ccc(pred: np.ndarray, target: np.ndarray, *, name: str | None = None) -> float:
    """Lin's concordance correlation coefficient, float64, population (1/N) moments.

    ``2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2)``. When both columns are
    constant and equal the ratio is 0/0: returns 0.0 and warns (``RuntimeWarning``).
    """
    x, y = _as_pair(pred, target, f"ccc{_label(name)}")  # (N,), (N,)
    mx, my = x.mean(), y.mean()
    cov = np.mean((x - mx) * (y - my))
    denom = x.var() + y.var() + (mx - my) ** 2
    if denom == 0.0:
        warnings.warn(
            f"CCC{_label(name)} is undefined: prediction and target are the same constant "
            f"{x[0]!r}; reporting 0.0",
            RuntimeWarning,
            stacklevel=2,
        )
        return 0.0
    return float(2.0 * cov / denom)


@dataclass
class Metrics:
    """Scores of one split; per-emotion dicts follow the emotion order given."""

    mean_pearson: float  # the challenge score: mean over emotions of pearson
    pearson: dict[str, float]  # Pearson r per emotion over the whole split
    ccc: dict[str, float]  # Lin's CCC per emotion
    mean_ccc: float  # mean over emotions of ccc
    mse: float  # mean squared error over all N * E elements
    n: int  # number of clips scored
    clipped: bool  # whether predictions were clipped to [0, 1] before scoring

    def to_dict(self) -> dict:
        """JSON-ready plain dict (python floats, ints, bools)."""
        d = asdict(self)
        return {
            "mean_pearson": float(d["mean_pearson"]),
            "pearson": {k: float(v) for k, v in d["pearson"].items()},
            "ccc": {k: float(v) for k, v in d["ccc"].items()},
            "mean_ccc": float(d["mean_ccc"]),
            "mse": float(d["mse"]),
            "n": int(d["n"]),
            "clipped": bool(d["clipped"]),
        }


def compute_metrics(
    pred: np.ndarray, target: np.ndarray, emotions: Sequence[str], *, clipped: bool = False
) -> Metrics:
    """Score predictions against targets, per emotion over the whole split, in float64.

    Args:
        pred: (N, E) predictions, any float dtype (converted to float64 first).
        target: (N, E) targets.
        emotions: (E,) unique column names.
        clipped: clip ``pred`` to [0, 1] before scoring (and record that in the result).
            Passing already-clipped predictions with ``clipped=True`` is harmless.

    Raises:
        ValueError: shape mismatch, wrong number of emotion names, fewer than 2 rows,
            NaN or infinite values.
    """
    names = tuple(emotions)
    if isinstance(emotions, str) or len(set(names)) != len(names):
        raise ValueError(f"compute_metrics: emotions must be unique names, got {emotions!r}")
    p = np.asarray(pred, dtype=np.float64)  # (N, E)
    t = np.asarray(target, dtype=np.float64)  # (N, E)
    if p.ndim != 2 or t.ndim != 2:
        raise ValueError(
            f"compute_metrics: expects 2-D (N, E) arrays, got pred {p.shape}, target {t.shape}"
        )
    if p.shape != t.shape:
        raise ValueError(f"compute_metrics: pred shape {p.shape} != target shape {t.shape}")
    if p.shape[1] != len(names):
        raise ValueError(
            f"compute_metrics: {p.shape[1]} columns but {len(names)} emotion names {list(names)}"
        )
    if p.shape[0] < 2:
        raise ValueError(f"compute_metrics: needs at least 2 rows, got {p.shape[0]}")
    for what, a in (("pred", p), ("target", t)):
        require_finite(a, f"compute_metrics: {what}", columns=names, column_word="emotion")
    if clipped:
        p = np.clip(p, 0.0, 1.0)

    per_r = {e: pearson(p[:, j], t[:, j], name=e) for j, e in enumerate(names)}
    per_c = {e: ccc(p[:, j], t[:, j], name=e) for j, e in enumerate(names)}
    return Metrics(
        mean_pearson=float(np.mean(list(per_r.values()))),
        pearson=per_r,
        ccc=per_c,
        mean_ccc=float(np.mean(list(per_c.values()))),
        mse=float(np.mean((p - t) ** 2)),
        n=int(p.shape[0]),
        clipped=bool(clipped),
    )
