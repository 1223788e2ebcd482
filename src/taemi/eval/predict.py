"""Batched inference over a dataset of clips."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from taemi.data.batch import Batch
from taemi.runtime import attention_backends, autocast


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
    batches: Iterable[Batch] | None = None,
) -> tuple[np.ndarray, float | None]:
    """Raw predictions (N, E) float32 in dataset order, and the MSE loss when targets exist.

    ``dataset`` is a :class:`~taemi.data.dataset.ClipDataset` (frozen features, model
    :class:`~taemi.model.taemi.TAEMI`) or a :class:`~taemi.finetune.data.FinetuneDataset`
    (model :class:`~taemi.finetune.model.FinetuneModel`); it supplies its ``collator()``.
    ``batches``: the dataset's batches in order, already built (e.g. on the device by
    :class:`~taemi.data.resident.ResidentFeatures`), instead of a DataLoader over it.

    Predictions and squared errors stay on the device until the last batch: one transfer
    at the end, no wait for the device per batch."""
    device = torch.device(device)
    if batches is None:
        batches = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=dataset.collator(),
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # its own: inference never advances the global RNG (training stays resumable)
        )
    was_training = model.training
    model.eval()
    preds, sq_err, n_el = [], torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
        batch = batch.to(device, non_blocking=True)
        with attention_backends(device), autocast(device, precision):
            out = model(batch)
        out = out.float()  # (B, E)
        preds.append(out)
        if batch.target is not None:
            sq_err += ((out - batch.target) ** 2).sum(dtype=torch.float64)
            n_el += batch.target.numel()
    model.train(was_training)
    if not preds:
        return np.zeros((0, model.num_outputs), np.float32), None
    pred = torch.cat(preds).cpu().numpy()  # (N, E): the one wait for the device
    return pred, (float(sq_err) / n_el if n_el else None)


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
