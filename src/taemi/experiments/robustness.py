"""Test-time robustness: degrade padded batches, re-score, plot the curves.

docs/method.md section 5 (``docs/method.md``): TAEMI replaces a missing modality by a
learned token and is trained with modality dropout, so it should degrade gracefully
when modalities, frames or transcripts are lost, or when features are noisy. This
module measures that on a labelled split.

Every degradation is a small deterministic function ``f(batch, ..., gen) -> Batch``
applied to a padded :class:`~taemi.data.batch.Batch` after collation and before the
model. It returns a NEW batch (the input is never modified) and draws all randomness
from the given seeded ``torch.Generator``:

- :func:`drop_modality`: a modality is marked missing for exactly ``round(p * B)``
  clips of each batch (rounded half up), chosen uniformly without replacement; an exact
  fraction per batch rather than a Bernoulli draw per clip, so curves have low variance.
- :func:`drop_combination`: every clip loses exactly the given modalities.
- :func:`add_noise`: Gaussian noise at a signal-to-noise ratio, per clip over its valid
  steps only.
- :func:`drop_frames`: a fraction of each clip's valid time steps becomes invalid.
- :func:`empty_transcripts`: an empty transcript is a missing text modality in this
  project (docs/method.md section 5), so this is :func:`drop_modality` on text.

A modality already missing in the data stays missing (no degradation can restore it),
and the features of a missing modality are left as they are (the model replaces them).

:func:`robustness_suite` runs every degradation over a grid of levels; each condition
starts from a generator seeded with the same ``seed`` (common random numbers: curves
differ by the level, not by the draw).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from taemi import MODALITIES
from taemi.data.batch import Batch
from taemi.data.dataset import ClipDataset, Collator
from taemi.data.labels import Labels
from taemi.eval.metrics import Metrics, compute_metrics
from taemi.model.taemi import TAEMI
from taemi.store import FeatureStore

log = logging.getLogger(__name__)

#: A degradation bound to its level: (batch, generator) -> degraded batch.
Transform = Callable[[Batch, torch.Generator], Batch]

#: The 8 missing-flag combinations (audio, vision, text), none missing first.
COMBINATIONS: tuple[tuple[bool, bool, bool], ...] = tuple(
    (bool(a), bool(v), bool(t)) for a in (0, 1) for v in (0, 1) for t in (0, 1)
)


def _modality_index(modality: str) -> int:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return MODALITIES.index(modality)


def _check_fraction(p: float, what: str) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what}: p={p} is not a fraction in [0, 1]")


def combination_name(missing: Sequence[bool]) -> str:
    """``(True, False, True)`` -> ``"audio+text"``; nothing missing -> ``"none"``."""
    names = [m for m, gone in zip(MODALITIES, missing) if gone]
    return "+".join(names) if names else "none"


def drop_modality(batch: Batch, modality: str, p: float, gen: torch.Generator) -> Batch:
    """Mark ``modality`` missing for exactly ``round(p * B)`` clips (half up), chosen at random.

    Only that modality's column of ``missing`` (B, 3) changes; clips already missing
    stay missing.
    """
    j = _modality_index(modality)
    _check_fraction(p, "drop_modality")
    B = len(batch)
    k = math.floor(p * B + 0.5)
    chosen = torch.randperm(B, generator=gen)[:k]  # (k,)
    missing = batch.missing.clone()  # (B, 3)
    missing[chosen.to(missing.device), j] = True
    return replace(batch, missing=missing)


def drop_combination(batch: Batch, missing: Sequence[bool]) -> Batch:
    """Every clip loses the modalities flagged in ``missing`` (audio, vision, text).

    The result's flags are ``batch.missing | missing``: exactly ``missing`` for clips that
    had all three modalities.
    """
    if len(missing) != len(MODALITIES):
        raise ValueError(
            f"drop_combination: expects {len(MODALITIES)} flags (audio, vision, text), got {missing!r}"
        )
    flags = torch.tensor([bool(m) for m in missing], device=batch.missing.device)  # (3,)
    return replace(batch, missing=batch.missing | flags)


def _noisy(x: Tensor, mask: Tensor, snr_db: float, gen: torch.Generator) -> Tensor:
    """x (B, T, D) plus Gaussian noise at valid steps (mask (B, T)); per-clip power over them."""
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    n_el = w.sum((1, 2)) * x.shape[-1]  # (B,) valid elements per clip
    power = (x.square() * w).sum((1, 2)) / n_el.clamp_min(1.0)  # (B,)
    std = (power / 10.0 ** (snr_db / 10.0)).sqrt()  # (B,)
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)  # (B, T, D)
    return x + noise * std.view(-1, 1, 1) * w


def add_noise(
    batch: Batch, snr_db: float | None, gen: torch.Generator, modalities: Sequence[str] = MODALITIES
) -> Batch:
    """Add Gaussian noise at ``snr_db`` dB to the features of ``modalities``.

    Per clip, the signal power is the mean square of its VALID features (all D of the
    text vector; every valid step of a sequence, and of the text token states when the
    batch has them); the noise variance is ``power / 10 ** (snr_db / 10)``. Padded steps
    and clips missing the modality are unchanged. ``snr_db`` None or +inf: no noise.
    """
    for m in modalities:
        _modality_index(m)
    if snr_db is None or snr_db == math.inf:
        return batch
    if math.isnan(snr_db):
        raise ValueError("add_noise: snr_db is NaN")
    out = {}
    for m in modalities:
        present = ~batch.missing[:, _modality_index(m)]  # (B,)
        if m == "text":
            mask = present.unsqueeze(1)  # (B, 1): the text vector is one valid step
            out["text"] = _noisy(batch.text.unsqueeze(1), mask, snr_db, gen).squeeze(1)  # (B, D_t)
            if batch.text_tokens is not None:
                tmask = batch.text_tokens_mask & present.unsqueeze(1)  # (B, T_t)
                out["text_tokens"] = _noisy(batch.text_tokens, tmask, snr_db, gen)
        else:
            mask = getattr(batch, f"{m}_mask") & present.unsqueeze(1)  # (B, T)
            out[m] = _noisy(getattr(batch, m), mask, snr_db, gen)  # (B, T, D)
    return replace(batch, **out)


def drop_frames(
    batch: Batch, p: float, gen: torch.Generator, modalities: Sequence[str] = ("audio", "vision")
) -> Batch:
    """Mark ``round(p * n)`` (half up) of each clip's ``n`` valid steps invalid, at random.

    At least one valid step is always kept; padded steps never become valid; clips
    missing the modality are unchanged. Features are untouched: only the masks change.
    """
    _check_fraction(p, "drop_frames")
    out = {}
    for m in modalities:
        if m not in ("audio", "vision"):
            raise ValueError(f"drop_frames: {m!r} has no time steps; expected audio and/or vision")
        mask = getattr(batch, f"{m}_mask")  # (B, T)
        present = ~batch.missing[:, _modality_index(m)]  # (B,)
        n = mask.sum(1)  # (B,)
        k = torch.minimum(
            torch.floor(p * n + 0.5).long(), (n - 1).clamp_min(0)
        )  # (B,) steps to drop
        k = torch.where(present, k, torch.zeros_like(k))
        scores = torch.rand(mask.shape, generator=gen).to(mask.device)  # (B, T)
        scores = scores.masked_fill(~mask, 2.0)  # padding sorts last
        rank = scores.argsort(1).argsort(1)  # (B, T): rank among the clip's steps
        dropped = (rank < k.unsqueeze(1)) & mask
        out[f"{m}_mask"] = mask & ~dropped
    return replace(batch, **out)


def empty_transcripts(batch: Batch, p: float, gen: torch.Generator) -> Batch:
    """Empty the transcript (text missing) of exactly ``round(p * B)`` clips: :func:`drop_modality`."""
    return drop_modality(batch, "text", p, gen)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_degraded(
    model: TAEMI,
    dataset: ClipDataset,
    transform: Transform | None,
    *,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Predictions (N, E) float32 in dataset order with ``transform`` applied to every batch.

    One generator seeded with ``seed`` serves all batches in order, so the result is a
    function of (model, dataset, transform, batch_size, seed). fp32, eval mode.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=Collator(model.dims, dataset.text_tokens),
        generator=torch.Generator(),
    )
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    preds = []
    for batch in loader:
        if transform is not None:
            batch = transform(batch, gen)
        preds.append(model(batch.to(device)).float().cpu().numpy())  # (B, E)
    model.train(was_training)
    return np.concatenate(preds) if preds else np.zeros((0, model.num_outputs), np.float32)


def evaluate_degraded(
    model: TAEMI,
    dataset: ClipDataset,
    transform: Transform | None,
    *,
    emotions: Sequence[str],
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Metrics:
    """Score :func:`predict_degraded` against the dataset's targets."""
    if dataset.targets is None:
        raise ValueError("evaluate_degraded: the dataset has no targets")
    pred = predict_degraded(
        model, dataset, transform, batch_size=batch_size, seed=seed, device=device
    )
    return compute_metrics(pred, dataset.targets, emotions)


# --------------------------------------------------------------------------- the suite


def conditions(
    ps: Sequence[float], snrs: Sequence[float]
) -> list[tuple[str, str, float | str, Transform | None]]:
    """(kind, condition, level, transform) for every degradation of the suite."""
    out: list[tuple[str, str, float | str, Transform | None]] = [("clean", "none", "", None)]
    for m in MODALITIES:
        for p in ps:
            out.append(("drop_modality", m, p, lambda b, g, m=m, p=p: drop_modality(b, m, p, g)))
    for combo in COMBINATIONS:
        out.append(
            (
                "combination",
                combination_name(combo),
                "",
                lambda b, g, c=combo: drop_combination(b, c),
            )
        )
    for s in snrs:
        out.append(("noise", "all", s, lambda b, g, s=s: add_noise(b, s, g)))
    for p in ps:
        out.append(("frame_drop", "audio+vision", p, lambda b, g, p=p: drop_frames(b, p, g)))
    return out


def robustness_suite(
    run_dir: str | os.PathLike,
    store: FeatureStore | str | os.PathLike,
    labels: Labels,
    *,
    ps: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    snrs: Sequence[float] = (30, 20, 10, 5, 0),
    seed: int = 0,
    which: str = "best",
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Score the run on ``labels`` under every degradation; one row per condition.

    Rows: ``run, kind, condition, level, mean_pearson, mean_ccc, mse`` and
    ``pearson_<emotion>`` per emotion. ``kind`` is clean | drop_modality (condition: the
    modality, level: p) | combination (condition: the missing modalities) | noise
    (level: SNR dB, all modalities) | frame_drop (level: p, audio and vision).
    With all three modalities missing every prediction is the same, so its Pearson r is
    0.0 (undefined; its warning is silenced for that condition only).
    """
    from taemi.inference import Predictor

    predictor = Predictor.from_run(run_dir, which, device=device)
    model, cfg = predictor.model, predictor.cfg
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    predictor.check_store(store)
    dataset = predictor.dataset(store, labels)
    bs = batch_size or cfg.train.eval_batch_size
    rows = []
    for kind, cond, level, transform in conditions(ps, snrs):
        with warnings.catch_warnings():
            if cond == combination_name((True, True, True)):
                # every clip is the same three missing tokens: constant predictions, r = 0 by
                # definition (metrics.pearson); the warning says nothing new here
                warnings.filterwarnings("ignore", "Pearson r .* is undefined", RuntimeWarning)
            m = evaluate_degraded(
                model,
                dataset,
                transform,
                emotions=cfg.data.emotions,
                batch_size=bs,
                seed=seed,
                device=device,
            )
        log.debug("%s %s %s: mean Pearson %.4f", kind, cond, level, m.mean_pearson)
        rows.append(
            {
                "run": str(run_dir),
                "kind": kind,
                "condition": cond,
                "level": level,
                "mean_pearson": m.mean_pearson,
                "mean_ccc": m.mean_ccc,
                "mse": m.mse,
                **{f"pearson_{e}": r for e, r in m.pearson.items()},
            }
        )
    return rows


def write_rows(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """CSV of suite rows (columns of the first row; every row must have the same keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError("write_rows: no rows")
    fields = list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            if list(r) != fields:
                raise ValueError(f"write_rows: row columns {list(r)} differ from {fields}")
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


# --------------------------------------------------------------------------- plots

_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def _runs(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["run"] for r in rows))


def _label(run: str, runs: list[str]) -> str:
    return Path(run).name if len({Path(r).name for r in runs}) == len(runs) else run


def _curve_plot(rows, path, kind: str, xlabel: str, title: str, invert_x: bool = False) -> Path:
    from taemi.train.plots import pyplot

    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = _runs(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    conds = list(dict.fromkeys(r["condition"] for r in rows if r["kind"] == kind))
    for i, run in enumerate(runs):
        for j, cond in enumerate(conds):
            pts = sorted(
                (float(r["level"]), r["mean_pearson"])
                for r in rows
                if r["run"] == run and r["kind"] == kind and r["condition"] == cond
            )
            if not pts:
                continue
            name = cond if len(runs) == 1 else f"{_label(run, runs)}: {cond}"
            ax.plot(
                *zip(*pts),
                ls=_STYLES[i % len(_STYLES)],
                marker=_MARKERS[i % len(_MARKERS)],
                color=f"C{j}",
                label=name,
            )
    if invert_x:
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean Pearson r")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_modality_drop(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Mean Pearson vs the fraction p of clips losing a modality; a line per modality (and run)."""
    return _curve_plot(
        rows,
        path,
        "drop_modality",
        "fraction of clips missing the modality (p)",
        "modality dropped at test time",
    )


def plot_noise(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Mean Pearson vs SNR (dB, decreasing to the right: more noise)."""
    return _curve_plot(rows, path, "noise", "SNR (dB)", "Gaussian feature noise", invert_x=True)


def plot_frame_drop(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Mean Pearson vs the fraction of audio/vision frames dropped."""
    return _curve_plot(rows, path, "frame_drop", "fraction of frames dropped (p)", "frames dropped")


def plot_combinations(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Grouped bars: mean Pearson for each of the 8 missing-modality combinations, per run."""
    from taemi.train.plots import pyplot

    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = _runs(rows)
    names = [combination_name(c) for c in COMBINATIONS]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, run in enumerate(runs):
        score = {
            r["condition"]: r["mean_pearson"]
            for r in rows
            if r["run"] == run and r["kind"] == "combination"
        }
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(names))]
        ax.bar(
            xs,
            [score.get(n, float("nan")) for n in names],
            width,
            color=f"C{i}",
            hatch=("", "//", "..", "xx")[i % 4],
            label=_label(run, runs),
        )
    ax.set_xticks(range(len(names)), [f"missing: {n}" for n in names], rotation=30, ha="right")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_ylabel("mean Pearson r")
    ax.set_title("missing-modality combinations")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(rows: Sequence[dict], out_dir: str | os.PathLike) -> list[Path]:
    """All four plots into ``out_dir``; several runs in ``rows`` are overlaid (compare)."""
    out = Path(out_dir)
    return [
        plot_modality_drop(rows, out / "modality_drop.png"),
        plot_noise(rows, out / "noise.png"),
        plot_frame_drop(rows, out / "frame_drop.png"),
        plot_combinations(rows, out / "combinations.png"),
    ]
