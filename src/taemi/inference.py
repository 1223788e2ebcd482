"""Inference from a trained run: the one entry point every caller goes through.

    predictor = Predictor.from_run(RUN, "best", device="cpu", precision="fp32")
    predictor.check_store(store)                      # the run's input sizes fit the store
    dataset = predictor.dataset(store, labels)        # or ids=[...] for unlabelled clips
    pred = predictor.predict(dataset)                 # (N, E) float32, raw (not clipped)

``evaluate``, ``predict --store``, prediction from media (:mod:`taemi.predict_media`),
the robustness suite (:mod:`taemi.experiments.robustness`) and the demo all use it. The
model of a run is rebuilt by its training mode (:func:`taemi.train.modes.mode_for`:
a fusion model, or backbones + fusion for a fine-tuning run) and its weights are loaded
strictly and checked finite (:func:`taemi.run.load_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from taemi import MODALITIES
from taemi.config import RunConfig
from taemi.data.batch import Batch
from taemi.data.labels import Labels
from taemi.eval.predict import check_finite_predictions, predict_dataset
from taemi.run import load_weights, read_config, weights_file
from taemi.runtime import attention_backends, autocast
from taemi.store import FeatureStore
from taemi.train.modes import check_store_fits, mode_for


def load_run(run_dir: str | os.PathLike, which: str = "best") -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the model of a run folder from its config and ``which`` weights; eval mode.

    A ``mode: finetune`` run gives a :class:`~taemi.finetune.model.FinetuneModel` (its
    weights hold the fine-tuned backbones too); any other a :class:`~taemi.model.taemi.TAEMI`."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model = mode_for(cfg).rebuild(run_dir, cfg)
    load_weights(model, weights_file(run_dir, which))
    return model.eval(), cfg


@dataclass
class Predictor:
    """A trained run's model and config, on a device, at a precision."""

    model: torch.nn.Module
    cfg: RunConfig
    run: str | os.PathLike  # as the caller named it (messages quote it)
    which: str = "best"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    @classmethod
    def from_run(
        cls,
        run: str | os.PathLike,
        which: str = "best",
        *,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ) -> Predictor:
        """Load ``run``'s ``which`` weights (see :func:`load_run`) onto ``device``."""
        model, cfg = load_run(run, which)
        return cls(model, cfg, run, which).on(device, precision)

    def on(self, device: torch.device | str, precision: str | None = None) -> Predictor:
        """Move the model to ``device`` (and set the autocast ``precision``); returns self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        if precision is not None:
            self.precision = precision
        return self

    def check_store(self, store: FeatureStore, *, new_run_message: bool = False) -> None:
        """The run's input sizes must equal ``store``'s feature sizes; the error names the
        run and its features.json (``new_run_message``: the message of a new training run,
        which suggests ``--set``)."""
        check_store_fits(self.cfg, store, run=None if new_run_message else self.run)

    def dataset(
        self, store: FeatureStore, labels: Labels | None = None, ids: Sequence[str] | None = None
    ):
        """The clips of ``labels`` (or ``ids``) as the run's mode reads them (no augmentation)."""
        return mode_for(self.cfg).dataset(self.cfg, store, labels, ids)

    def predict(
        self,
        dataset,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        desc: str = "predict",
        check: str | None = None,
    ) -> np.ndarray:
        """Raw predictions (N, E) float32 in dataset order, batches of ``train.eval_batch_size``.

        ``check``: what is being predicted, to refuse NaN/Inf predictions with a message
        naming the clips (the weights were checked finite on load, so their features are not)."""
        pred, _ = predict_dataset(
            self.model,
            dataset,
            batch_size=batch_size or self.cfg.train.eval_batch_size,
            device=self.device,
            precision=self.precision,
            progress=progress,
            desc=desc,
        )
        if check is not None:
            check_finite_predictions(pred, dataset.ids, check, cause=features_cause(dataset.store))
        return pred

    @property
    def has_attention(self) -> bool:
        """Whether the model is text-anchored cross-attention, whose weights over the audio
        and vision steps :meth:`predict_items` can return (not a fine-tuning run's model,
        nor the concat / self-attention fusions or another anchor)."""
        from taemi.model.taemi import TAEMI

        return (
            isinstance(self.model, TAEMI)
            and self.model.cfg.fusion == "cross_attention"
            and self.model.anchor == "text"
        )

    @torch.no_grad()
    def predict_items(
        self, items: Sequence, collate: Callable[[list], Batch], *, attention: bool = False
    ) -> tuple[np.ndarray, dict[str, list[np.ndarray | None]]]:
        """Raw predictions (N, E) float32 of dataset items (``dataset[i]``, from any datasets
        of this run) as ONE batch ``collate(items)`` (a dataset's ``collator()``): what a
        server that batches clips of several requests needs. The same values as
        :meth:`predict` (the model's outputs do not depend on padding).

        ``attention`` (only when :attr:`has_attention`, else ValueError): also, per
        non-anchor modality (audio, vision), per item the head-mean cross-attention weights
        over its VALID steps, (T_i,) float32 summing to 1, or None when that modality is
        missing for the item (its learned token was attended to, not the clip)."""
        if attention and not self.has_attention:
            raise ValueError(
                f"{self.run}: its model has no text-anchored cross-attention (fusion "
                f"{getattr(self.cfg.model, 'fusion', None)!r}, anchor "
                f"{getattr(self.cfg.model, 'anchor', None)!r}, mode {self.cfg.mode!r})"
            )
        batch = collate(list(items)).to(self.device)
        with attention_backends(self.device), autocast(self.device, self.precision):
            if attention:
                out, weights = self.model(batch, return_attention=True)
            else:
                out, weights = self.model(batch), {}
        pred = out.float().cpu().numpy()  # (N, E)
        per_item: dict[str, list[np.ndarray | None]] = {}
        for m, w in weights.items():
            i = MODALITIES.index(m)
            w = w.float().cpu()  # (N, T)
            mask = getattr(batch, f"{m}_mask").cpu()  # (N, T)
            missing = batch.missing[:, i].cpu()  # (N,)
            per_item[m] = [
                None if bool(missing[b]) else w[b][mask[b]].numpy() for b in range(len(w))
            ]
        return pred, per_item


def features_cause(store: FeatureStore) -> str:
    """Why predictions of a loaded run can be NaN/Inf: its weights were checked finite on
    load (:func:`taemi.run.load_weights`), so the clips' features are not."""
    return f"the run's weights are finite, so these clips' features hold NaN/Inf (taemi store verify {store.root})"
