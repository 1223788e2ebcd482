"""Is model A really better than model B? Paired bootstrap of the challenge score.

The challenge score (docs/method.md section 1) is the mean over emotions of Pearson's r over the
whole split, so it is not a mean over clips and has no closed-form standard error. The
paired bootstrap resamples CLIPS with replacement, the same indices for both models,
recomputes both scores on every resample and reads a percentile confidence interval of
the difference off the resampled differences (B. Efron and R. Tibshirani, "An
Introduction to the Bootstrap", 1993, ch. 13 (percentile intervals) and 16 (tests);
for paired comparisons of systems on one test set: P. Koehn, "Statistical Significance
Tests for Machine Translation Evaluation", EMNLP 2004).

Resamples are scored in chunks on index arrays, in float64. A column that is constant
within a resample has an undefined r, scored 0.0 like :func:`taemi.eval.metrics.pearson`
but silently (a warning per resample would flood the log); the point estimates on the
full split use :func:`~taemi.eval.metrics.pearson` itself, warnings included.

:func:`seed_spread` summarises one configuration trained under several seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from taemi.eval.metrics import pearson
from taemi.numeric import require_finite

__all__ = ["BootstrapResult", "paired_bootstrap", "resampled_mean_pearson", "seed_spread"]

#: Upper bound on the float64 elements of one gathered (chunk, N, E) block (~32 MB).
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap comparison of two predictors' mean Pearson on the same clips."""

    mean_a: float  # mean Pearson of A on the full split
    mean_b: float  # mean Pearson of B on the full split
    diff: float  # mean_a - mean_b
    ci_low: float  # lower percentile bound of the (1 - alpha) CI of diff
    ci_high: float  # upper percentile bound
    p_value: float  # two-sided: 2 x share of resampled diffs of the other sign (or 0), <= 1
    n: int  # clips
    n_boot: int  # resamples
    alpha: float = 0.05  # 1 - confidence level of [ci_low, ci_high]

    def to_dict(self) -> dict:
        """JSON-ready plain dict."""
        return {k: (int(v) if k in ("n", "n_boot") else float(v)) for k, v in asdict(self).items()}


def _as_matrix(a: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]  # (N,) -> (N, 1)
    if x.ndim != 2:
        raise ValueError(f"paired_bootstrap: {what} must be (N,) or (N, E), got shape {x.shape}")
    require_finite(x, f"paired_bootstrap: {what}")
    return x


def _centred(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (b, N, E) along N; also whether each (b, E) column is constant."""
    constant = x.max(axis=1) == x.min(axis=1)  # (b, E)
    xc = x - x.mean(axis=1, keepdims=True)  # (b, N, E)
    return xc, constant


def _pearson_rows(
    xc: np.ndarray, x_const: np.ndarray, yc: np.ndarray, y_const: np.ndarray, y_norm: np.ndarray
) -> np.ndarray:
    """Mean over E of Pearson r per resample, from centred (b, N, E) blocks -> (b,)."""
    num = np.einsum("bne,bne->be", xc, yc)  # (b, E)
    den = np.sqrt(np.einsum("bne,bne->be", xc, xc)) * y_norm  # (b, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    r = np.where(x_const | y_const | ~np.isfinite(r), 0.0, np.clip(r, -1.0, 1.0))  # (b, E)
    return r.mean(axis=1)


def resampled_mean_pearson(
    preds: Sequence[np.ndarray], target: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """Mean Pearson of each predictor on each resample.

    Args:
        preds: K arrays (N, E) (or (N,)), float64 after conversion.
        target: (N, E) (or (N,)).
        idx: (B, N') row indices of the resamples (N' is usually N).

    Returns:
        (K, B) mean over emotions of Pearson r; constant columns count as 0.0, silently.
    """
    t = _as_matrix(target, "target")
    ps = [_as_matrix(p, f"preds[{k}]") for k, p in enumerate(preds)]
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 2:
        raise ValueError(f"resampled_mean_pearson: idx must be (B, N), got shape {idx.shape}")
    out = np.empty((len(ps), idx.shape[0]), dtype=np.float64)  # (K, B)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, idx.shape[1] * t.shape[1]))
    for s in range(0, idx.shape[0], chunk):
        rows = idx[s : s + chunk]  # (b, N)
        yc, y_const = _centred(t[rows])  # (b, N, E), (b, E)
        y_norm = np.sqrt(np.einsum("bne,bne->be", yc, yc))  # (b, E)
        for k, p in enumerate(ps):
            xc, x_const = _centred(p[rows])
            out[k, s : s + chunk] = _pearson_rows(xc, x_const, yc, y_const, y_norm)
    return out


def _mean_pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """The challenge score on the full split (via metrics.pearson; it warns on constants)."""
    return float(np.mean([pearson(pred[:, j], target[:, j]) for j in range(target.shape[1])]))


def paired_bootstrap(
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    target: np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapResult:
    """Paired bootstrap over clips of mean Pearson(A) - mean Pearson(B).

    Args:
        pred_a: (N, E) predictions of model A (or (N,) for one emotion).
        pred_b: (N, E) predictions of model B, rows aligned with ``pred_a``.
        target: (N, E) targets, rows aligned too.
        n_boot: number of resamples of N clips drawn with replacement.
        seed: seed of the resampling (numpy ``default_rng``).
        alpha: the interval is the (alpha/2, 1 - alpha/2) percentile interval.

    Returns:
        Point estimates on the full split, the percentile CI of the difference and a
        two-sided p-value: twice the share of resampled differences on the other side of
        zero from the observed one (ties at zero included), capped at 1; 1.0 when the
        observed difference is exactly 0. A p-value of 0 means below 1 / n_boot.

    Raises:
        ValueError: mismatched shapes, fewer than 2 clips, NaN/Inf, bad n_boot or alpha.
    """
    a = _as_matrix(pred_a, "pred_a")  # (N, E)
    b = _as_matrix(pred_b, "pred_b")  # (N, E)
    t = _as_matrix(target, "target")  # (N, E)
    if not a.shape == b.shape == t.shape:
        raise ValueError(
            f"paired_bootstrap: shapes differ: pred_a {a.shape}, pred_b {b.shape}, target {t.shape}"
        )
    n = t.shape[0]
    if n < 2:
        raise ValueError(f"paired_bootstrap: needs at least 2 clips, got {n}")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"paired_bootstrap: n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"paired_bootstrap: alpha must lie in (0, 1), got {alpha!r}")

    mean_a, mean_b = _mean_pearson(a, t), _mean_pearson(b, t)
    diff = mean_a - mean_b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(int(n_boot), n))  # (B, N) the same clips for A and B
    scores = resampled_mean_pearson([a, b], t, idx)  # (2, B)
    diffs = scores[0] - scores[1]  # (B,)
    lo, hi = np.quantile(diffs, [alpha / 2.0, 1.0 - alpha / 2.0])
    if diff > 0:
        p = 2.0 * float(np.mean(diffs <= 0.0))
    elif diff < 0:
        p = 2.0 * float(np.mean(diffs >= 0.0))
    else:
        p = 1.0
    return BootstrapResult(
        mean_a=mean_a,
        mean_b=mean_b,
        diff=diff,
        ci_low=float(lo),
        ci_high=float(hi),
        p_value=min(1.0, p),
        n=n,
        n_boot=int(n_boot),
        alpha=float(alpha),
    )


def seed_spread(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1) and count of per-seed scores.

    One value gives std NaN (undefined). Raises ``ValueError`` on no values or NaN/Inf.
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"seed_spread: expects a non-empty list of numbers, got {values!r}")
    if not np.isfinite(v).all():
        raise ValueError(f"seed_spread: non-finite value in {v.tolist()}")
    std = float(np.std(v, ddof=1)) if v.size > 1 else math.nan
    return float(v.mean()), std, int(v.size)
