"""From a feature store (and labels) to padded batches for the model.

Reads clips lazily from the memory-mapped store, so memory does not grow with
the number of clips; float16 rows become float32 only inside a batch.
Sequences keep their FIRST ``max_*_len`` steps (the release keeps the first 400
face frames; 599 audio frames are the first 12 s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from taemi.data.batch import Batch, padded_length
from taemi.store import FeatureStore


@dataclass
class Item:
    """One clip, trimmed, still in the store's dtype (numpy)."""

    clip_id: str
    audio: np.ndarray | None  # (T_a, D_a)
    vision: np.ndarray | None  # (T_v, D_v)
    text: np.ndarray | None  # (D_t,)
    text_tokens: np.ndarray | None  # (T_t, D_t)
    target: np.ndarray | None  # (E,)


def check_clips(store: FeatureStore, ids: Sequence[str], targets: np.ndarray | None) -> None:
    """Every id is in ``store`` and ``targets`` (if any) has one row per id."""
    missing = [i for i in ids if i not in store]
    if missing:
        raise KeyError(
            f"{len(missing)} clip ids are not in the feature store {store.root}: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    if targets is not None and len(targets) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(targets)} target rows")


class ClipDataset(Dataset):
    """Clips ``ids`` of ``store`` with optional targets (N, E).

    ``text_tokens=True`` also yields the store's text token states (the store must
    have them). Pickles cheaply (the store reopens its memmaps in worker processes).
    """

    def __init__(
        self,
        store: FeatureStore,
        ids: Sequence[str],
        targets: np.ndarray | None = None,
        *,
        max_audio_len: int = 599,
        max_vision_len: int = 400,
        max_text_tokens: int = 128,
        text_tokens: bool = False,
        modalities: Sequence[str] = ("audio", "vision", "text"),
        length_quantum: int = 1,
    ):
        check_clips(store, ids, targets)
        if text_tokens and not store.has_text_tokens:
            raise ValueError(
                f"text token states were requested but the store {store.root} has none"
            )
        self.store = store
        self.ids = list(ids)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        self.max_audio_len = max_audio_len
        self.max_vision_len = max_vision_len
        self.max_text_tokens = max_text_tokens
        self.text_tokens = text_tokens
        self.length_quantum = int(length_quantum)  # batches are padded to a multiple of it
        self.hidden = {
            m for m in ("audio", "vision", "text") if m not in modalities
        }  # always missing

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Item:
        clip = self.store.get(self.ids[i])
        for m in self.hidden:  # a unimodal / bimodal baseline: the model never sees these
            setattr(clip, m, None)
            if m == "text":
                clip.text_tokens = None
        return Item(
            clip_id=clip.clip_id,
            audio=None if clip.audio is None else clip.audio[: self.max_audio_len],
            vision=None if clip.vision is None else clip.vision[: self.max_vision_len],
            text=clip.text,
            text_tokens=(
                clip.text_tokens[: self.max_text_tokens]
                if self.text_tokens and clip.text_tokens is not None
                else None
            ),
            target=None if self.targets is None else self.targets[i],
        )

    def lengths(self) -> np.ndarray:
        """(N, K) int64 trimmed sequence lengths per clip, from the store's index (no feature
        is read): audio, vision, and the text token states when this dataset yields them; 0
        for a missing or hidden modality (:func:`taemi.data.sampler.dataset_lengths`)."""
        from taemi.data.sampler import dataset_lengths

        return dataset_lengths(
            self.store,
            self.ids,
            self.max_audio_len,
            self.max_vision_len,
            modalities=[m for m in ("audio", "vision", "text") if m not in self.hidden],
            max_text_tokens=self.max_text_tokens if self.text_tokens else None,
        )

    def collator(self) -> Collator:
        """The ``collate_fn`` that batches this dataset's items."""
        return Collator(self.store.dims, self.text_tokens, self.length_quantum)


def _pad(
    seqs: list[np.ndarray | None], dim: int, quantum: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length (T_i, D) arrays (None = missing: one zero step) -> (B, T, D), mask (B, T),
    T the longest rounded up to a multiple of ``quantum`` (:func:`taemi.data.batch.padded_length`)."""
    lengths = [0 if s is None else len(s) for s in seqs]
    T = padded_length(max(lengths), quantum)
    out = np.zeros((len(seqs), T, dim), dtype=np.float32)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for b, s in enumerate(seqs):
        if s is not None:
            out[b, : len(s)] = s
            mask[b, : len(s)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def collate(
    items: list[Item], dims: dict[str, int], text_tokens: bool = False, quantum: int = 1
) -> Batch:
    """Pad a list of items into a :class:`Batch` (float32, masks True at valid steps); the
    sequences are padded to a multiple of ``quantum`` steps."""
    audio, audio_mask = _pad([it.audio for it in items], dims["audio"], quantum)  # (B, T_a, D_a)
    vision, vision_mask = _pad(
        [it.vision for it in items], dims["vision"], quantum
    )  # (B, T_v, D_v)
    text = np.zeros((len(items), dims["text"]), dtype=np.float32)
    for b, it in enumerate(items):
        if it.text is not None:
            text[b] = it.text
    missing = torch.tensor([[it.audio is None, it.vision is None, it.text is None] for it in items])
    tok, tok_mask = (None, None)
    if text_tokens:
        tok, tok_mask = _pad(
            [it.text_tokens for it in items], dims["text"], quantum
        )  # (B, T_t, D_t)
    target = None
    if items[0].target is not None:
        target = torch.from_numpy(
            np.stack([it.target for it in items]).astype(np.float32)
        )  # (B, E)
    return Batch(
        audio=audio,
        audio_mask=audio_mask,
        vision=vision,
        vision_mask=vision_mask,
        text=torch.from_numpy(text),
        missing=missing,
        text_tokens=tok,
        text_tokens_mask=tok_mask,
        target=target,
        ids=tuple(it.clip_id for it in items),
    )


class Collator:
    """Picklable ``collate_fn`` for DataLoader workers."""

    def __init__(self, dims: dict[str, int], text_tokens: bool = False, quantum: int = 1):
        self.dims = dict(dims)
        self.text_tokens = text_tokens
        self.quantum = quantum

    def __call__(self, items: list[Item]) -> Batch:
        return collate(items, self.dims, self.text_tokens, self.quantum)
