"""The padded batch every model consumes: :class:`Batch`.

Built by :class:`taemi.data.dataset.FeatureDataset`'s collate (and by the fine-tuning,
robustness and inference paths), consumed by :class:`taemi.model.taemi.TAEMI`. It lives
in ``data/`` so that data code never imports the model (the layers import downwards only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def padded_length(t: int, quantum: int = 1) -> int:
    """The length a batch whose longest sequence has ``t`` steps is padded to: at least one
    step (a missing modality is one step of its token), rounded up to a multiple of
    ``quantum``. With a quantum the batches take a finite set of shapes (on a GPU: few
    kernel plans and one CUDA graph per shape) at the cost of some padding; the model's
    outputs do not depend on padding (``tests/test_model.py``)."""
    if quantum < 1:
        raise ValueError(f"quantum must be >= 1, got {quantum!r}")
    t = max(1, int(t))
    return -(-t // quantum) * quantum


@dataclass
class Batch:
    """A padded batch of clips. Masks are ``True`` at valid steps.

    ``missing`` is (B, 3) in :data:`taemi.MODALITIES` order (audio, vision, text).
    A missing modality's rows may hold anything finite (usually one zero step): the
    model replaces them by its missing token.
    """

    audio: Tensor  # (B, T_a, D_a)
    audio_mask: Tensor  # (B, T_a) bool
    vision: Tensor  # (B, T_v, D_v)
    vision_mask: Tensor  # (B, T_v) bool
    text: Tensor  # (B, D_t)
    missing: Tensor  # (B, 3) bool
    text_tokens: Tensor | None = None  # (B, T_t, D_t), optional token states
    text_tokens_mask: Tensor | None = None  # (B, T_t) bool
    target: Tensor | None = None  # (B, E)
    ids: tuple[str, ...] = ()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def mv(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return Batch(
            audio=mv(self.audio),
            audio_mask=mv(self.audio_mask),
            vision=mv(self.vision),
            vision_mask=mv(self.vision_mask),
            text=mv(self.text),
            missing=mv(self.missing),
            text_tokens=mv(self.text_tokens),
            text_tokens_mask=mv(self.text_tokens_mask),
            target=mv(self.target),
            ids=self.ids,
        )

    def __len__(self) -> int:
        return self.text.shape[0]
