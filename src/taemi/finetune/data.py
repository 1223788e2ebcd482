"""Clips for end-to-end fine-tuning: raw audio, transcript text, stored vision features.

docs/method.md sections 3 and 6: the authors fine-tuned the audio backbone on the first 12 s of
16 kHz mono audio and the text encoder on the transcript, with pre-extracted vision
features. Per clip this module reads

- the waveform from the store's decoded-audio cache (``STORE/waveforms/``, written by
  ``taemi extract --waveforms``), cut to ``max_audio_seconds`` and, while training,
  optionally augmented (:mod:`taemi.data.augment`; draws depend on (seed, epoch, clip));
- the transcript from ``STORE/transcripts/{id}.txt``;
- the vision sequence from the feature store (memory-mapped, as in frozen mode).

The store's missing flags decide what is missing: a clip whose audio is missing in the
store (no audio track) has no waveform; a clip whose text is missing (empty transcript)
has no text. A clip the store says HAS audio but whose waveform is not cached is an
error that says how to fix it; nothing falls back to the stored audio features.

A batch (:class:`FinetuneBatch`) pads waveforms with zeros to the batch's longest clip
and keeps each clip's own sample count, from which the audio backbone derives the
per-sample attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from taemi.config import AugmentConfig
from taemi.data.dataset import check_clips
from taemi.store import TRANSCRIPTS, FeatureStore
from taemi.store.waveforms import SAMPLE_RATE, WaveformCache


@dataclass
class RawItem:
    """One clip for fine-tuning (numpy; None = missing)."""

    clip_id: str
    waveform: np.ndarray | None  # (S,) float32, 16 kHz, S <= max_audio_seconds * 16000
    vision: np.ndarray | None  # (T_v, D_v), the store's dtype
    transcript: str | None  # stripped, non-empty
    target: np.ndarray | None  # (E,)


@dataclass
class FinetuneBatch:
    """A padded batch of raw clips. ``missing`` is (B, 3) in (audio, vision, text) order."""

    waves: Tensor  # (B, S_max) float32, zero-padded; rows of clips without audio are zeros
    wave_lengths: Tensor  # (B,) int64, each clip's own sample count (0 when audio is missing)
    vision: Tensor  # (B, T_v, D_v) float32
    vision_mask: Tensor  # (B, T_v) bool, True at valid frames
    texts: tuple[str, ...]  # transcripts ('' when text is missing)
    missing: Tensor  # (B, 3) bool
    target: Tensor | None = None  # (B, E)
    ids: tuple[str, ...] = ()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FinetuneBatch:
        def mv(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return FinetuneBatch(
            waves=mv(self.waves),
            wave_lengths=mv(self.wave_lengths),
            vision=mv(self.vision),
            vision_mask=mv(self.vision_mask),
            texts=self.texts,
            missing=mv(self.missing),
            target=mv(self.target),
            ids=self.ids,
        )

    def __len__(self) -> int:
        return len(self.texts)


def read_transcript(store_root: Path, clip_id: str) -> str:
    """``STORE/transcripts/{id}.txt`` stripped; a clear error when the file is absent."""
    path = store_root / TRANSCRIPTS / f"{clip_id}.txt"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"clip {clip_id!r}: the store {store_root} says it has text but its transcript {path} "
            "does not exist; fine-tuning the text backbone needs the transcripts written by "
            "`taemi extract` (rerun extraction into this store)"
        ) from None


class FinetuneDataset(Dataset):
    """Clips ``ids`` of ``store`` (with their waveform cache and transcripts) and targets (N, E).

    ``augment`` (training only) is applied to each waveform with a generator seeded by
    (augment.seed, epoch, index): call :meth:`set_epoch` before each epoch. Pickles
    cheaply (the store and the cache reopen their files in worker processes).
    """

    def __init__(
        self,
        store: FeatureStore,
        ids: Sequence[str],
        targets: np.ndarray | None = None,
        *,
        max_audio_seconds: float = 12.0,
        max_vision_len: int = 400,
        modalities: Sequence[str] = ("audio", "vision", "text"),
        augment: AugmentConfig | None = None,
    ):
        check_clips(store, ids, targets)
        self.store = store
        self.ids = list(ids)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        self.max_samples = round(max_audio_seconds * SAMPLE_RATE)
        self.max_vision_len = max_vision_len
        self.hidden = {
            m for m in ("audio", "vision", "text") if m not in modalities
        }  # always missing
        self.text_tokens = False  # the text backbone gives one vector (no stored token states)
        self.augment_cfg = augment if augment is not None and augment.enabled else None
        self._augment = None
        self.epoch = 0
        rows = np.array([store.index(i) for i in self.ids], dtype=np.int64)
        self._missing = (
            np.asarray(store.missing)[rows] if len(rows) else np.zeros((0, 3), bool)
        )  # (N, 3)
        need = (
            [i for i, m in zip(self.ids, self._missing) if not m[0]]
            if "audio" not in self.hidden
            else []
        )
        self.waveforms = (
            WaveformCache(store.root, max_seconds=None) if need else None
        )  # read: any cut
        if (
            need
            and self.waveforms.max_seconds is not None
            and self.waveforms.max_seconds < max_audio_seconds
        ):
            raise ValueError(
                f"finetune.max_audio_seconds={max_audio_seconds} but the waveform cache of {store.root} holds only "
                f"the first {self.waveforms.max_seconds} s of each clip; lower it or re-extract with a longer cut"
            )
        if need:
            absent = [i for i in need if i not in self.waveforms]
            if absent:
                raise FileNotFoundError(
                    f"{len(absent)} clips with audio have no cached waveform in {store.root}/waveforms "
                    f"(e.g. {absent[:3]}); fine-tuning reads raw audio from that cache: run "
                    f"`taemi extract ... --out {store.root} --waveforms` (finished clips are not re-encoded)"
                )

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, clip): set before each training epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def _waveform(self, i: int) -> np.ndarray:
        w = self.waveforms.get(self.ids[i])[: self.max_samples]  # (S,) float32
        if self.augment_cfg is not None:
            from taemi.data.augment import WaveformAugment, augment_rng

            if self._augment is None:
                self._augment = WaveformAugment(
                    self.augment_cfg, max_seconds=self.max_samples / SAMPLE_RATE
                )
            w = self._augment(w, augment_rng(self.augment_cfg.seed, self.epoch, i))[
                : self.max_samples
            ]
        return np.ascontiguousarray(w, dtype=np.float32)

    def __getitem__(self, i: int) -> RawItem:
        clip_id = self.ids[i]
        miss = self._missing[i]
        vision = None
        if not miss[1] and "vision" not in self.hidden:
            vision = self.store.get(clip_id).vision[: self.max_vision_len]  # (T_v, D_v) view
        waveform = None if miss[0] or "audio" in self.hidden else self._waveform(i)
        transcript = None
        if not miss[2] and "text" not in self.hidden:
            transcript = read_transcript(self.store.root, clip_id) or None
        return RawItem(
            clip_id=clip_id,
            waveform=waveform,
            vision=vision,
            transcript=transcript,
            target=None if self.targets is None else self.targets[i],
        )

    def collator(self) -> FinetuneCollator:
        return FinetuneCollator(self.store.dims["vision"])


class FinetuneCollator:
    """Picklable ``collate_fn``: RawItems -> :class:`FinetuneBatch`."""

    def __init__(self, vision_dim: int):
        self.vision_dim = vision_dim

    def __call__(self, items: list[RawItem]) -> FinetuneBatch:
        B = len(items)
        lengths = [0 if it.waveform is None else len(it.waveform) for it in items]
        waves = np.zeros((B, max(1, max(lengths))), dtype=np.float32)  # (B, S_max)
        for b, it in enumerate(items):
            if it.waveform is not None:
                waves[b, : lengths[b]] = it.waveform
        T = max(1, max(0 if it.vision is None else len(it.vision) for it in items))
        vision = np.zeros((B, T, self.vision_dim), dtype=np.float32)  # (B, T_v, D_v)
        vmask = np.zeros((B, T), dtype=bool)
        for b, it in enumerate(items):
            if it.vision is not None:
                vision[b, : len(it.vision)] = it.vision
                vmask[b, : len(it.vision)] = True
        missing = torch.tensor(
            [[it.waveform is None, it.vision is None, it.transcript is None] for it in items]
        )
        target = None
        if items[0].target is not None:
            target = torch.from_numpy(
                np.stack([it.target for it in items]).astype(np.float32)
            )  # (B, E)
        return FinetuneBatch(
            waves=torch.from_numpy(waves),
            wave_lengths=torch.tensor(lengths, dtype=torch.long),
            vision=torch.from_numpy(vision),
            vision_mask=torch.from_numpy(vmask),
            texts=tuple(it.transcript or "" for it in items),
            missing=missing,
            target=target,
            ids=tuple(it.clip_id for it in items),
        )
