"""Batched inference over a dataset of clips."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from taemi.runtime import autocast


@torch.no_grad()
def predict_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "predict",
) -> tuple[np.ndarray, float | None]:
    """Raw predictions (N, E) float32 in dataset order, and the MSE loss when targets exist.

    ``dataset`` is a :class:`~taemi.data.dataset.ClipDataset` (frozen features, model
    :class:`~taemi.model.taemi.TAEMI`) or a :class:`~taemi.finetune.data.FinetuneDataset`
    (model :class:`~taemi.finetune.model.FinetuneModel`); it supplies its ``collator()``."""
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=dataset.collator(),
        generator=torch.Generator(),  # its own: inference never advances the global RNG (training stays resumable)
    )
    was_training = model.training
    model.eval()
    preds, sq_err, n_el = [], 0.0, 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        batch = batch.to(device)
        with autocast(device, precision):
            out = model(batch)
        out = out.float()  # (B, E)
        preds.append(out.cpu().numpy())
        if batch.target is not None:
            sq_err += float(((out - batch.target) ** 2).sum(dtype=torch.float64))
            n_el += batch.target.numel()
    model.train(was_training)
    pred = np.concatenate(preds) if preds else np.zeros((0, model.num_outputs), np.float32)
    return pred, (sq_err / n_el if n_el else None)


def check_finite_predictions(pred: np.ndarray, ids, where: str, *, cause: str) -> None:
    """Raise ValueError naming the clips whose predictions (N, E) hold NaN/Inf, with
    ``where`` (what was predicted) and ``cause`` (what the caller knows of the reason),
    instead of letting the metric fail later on an anonymous NaN count."""
    bad = ~np.isfinite(pred).all(axis=1)  # (N,)
    if bad.any():
        names = [ids[i] for i in np.flatnonzero(bad)[:5]]
        raise ValueError(
            f"{where}: the predictions of {int(bad.sum())} clip(s) are NaN/Inf (e.g. {', '.join(names)}); {cause}"
        )
