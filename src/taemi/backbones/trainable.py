"""The trainable form of a backbone: what every family's ``*Backbone`` shares
(docs/method.md sections 3 and 6).

The release fine-tunes its audio backbone and the GTE text encoder end to end with the
fusion model (docs/method.md section 6). The frozen encoders of each family compute features under
``torch.inference_mode``; their trainable forms compute the same features with
gradients, from raw 16 kHz waveforms (:class:`AudioBackbone`: ``forward(waves, lengths)
-> (features, mask)``) and from transcripts (:class:`~taemi.backbones.text.TextBackbone`).

Padding (docs/method.md section 8). Every output frame count is derived from each clip's OWN sample
count, and no clip's output depends on its batch-mates (each family says how).

Training behaviour. Dropout and SpecAugment-style time masking of a Hugging Face config
(``hidden_dropout``, ``attention_dropout``, ``mask_time_prob`` ...) apply in train mode as
in transformers' own fine-tuning; wav2vec2 LayerDrop is set to 0 (a dropped layer's
parameters get no gradient in that step, which DistributedDataParallel rejects unless
``find_unused_parameters=True``, and the set of dropped layers differs between ranks).
Whisper has no dropout (as released). Freezing (``freeze_feature_encoder``,
``freeze_layers``) only sets ``requires_grad=False``: frozen modules stay in whatever
mode the backbone is in, so dropout inside frozen layers still acts in train mode, as it
does with transformers' own ``freeze_feature_encoder``. Parameters are float32 (master
weights); mixed precision is the caller's ``torch.autocast`` (the Whisper log-mel always
runs in float32).

A backbone's architecture (no weights) is written beside the model's own config files as
:data:`ARCHITECTURE_FILE` (:func:`write_architecture`), so that a run folder can rebuild
it without the pretrained weights (:func:`taemi.backbones.profiles.rebuild_audio_backbone`,
:func:`taemi.backbones.text.rebuild_text_backbone`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taemi.backbones.base import SAMPLE_RATE

#: What :meth:`AudioBackbone.save_architecture` / :meth:`TextBackbone.save_architecture`
#: write beside the model's own config files: the backbone kind and its settings.
ARCHITECTURE_FILE = "backbone.json"
ARCHITECTURE_FORMAT = 1


def check_waves(waves: Tensor, lengths: Tensor) -> Tensor:
    """Validate ``waves`` (B, S) float and ``lengths`` (B,) int; lengths on waves' device."""
    if not isinstance(waves, Tensor) or waves.ndim != 2 or not waves.is_floating_point():
        raise ValueError(
            "waves must be a (B, S) float tensor of 16 kHz samples, got "
            f"{getattr(waves, 'shape', type(waves))} {getattr(waves, 'dtype', '')}"
        )
    if (
        not isinstance(lengths, Tensor)
        or lengths.shape != waves.shape[:1]
        or lengths.is_floating_point()
        or lengths.is_complex()
    ):
        raise ValueError(
            f"lengths must be a ({waves.shape[0]},) integer tensor of sample counts, got "
            f"{getattr(lengths, 'shape', type(lengths))} {getattr(lengths, 'dtype', '')}"
        )
    lengths = lengths.to(device=waves.device, dtype=torch.long)
    bad = ((lengths < 0) | (lengths > waves.shape[1])).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"lengths of clips {bad} are {lengths[bad].tolist()}, outside [0, {waves.shape[1]}] "
            "(the padded width of waves)"
        )
    return lengths


def write_architecture(folder: Path, kind: str, fields: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": ARCHITECTURE_FORMAT, "kind": kind, **fields}
    (folder / ARCHITECTURE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_architecture(folder: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    path = Path(folder) / ARCHITECTURE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: pass the folder written by save_architecture()"
        )
    record = json.loads(path.read_text())
    if record.get("format") != ARCHITECTURE_FORMAT or record.get("kind") not in kinds:
        raise ValueError(
            f"{path}: format {record.get('format')!r} kind {record.get('kind')!r}; expected "
            f"format {ARCHITECTURE_FORMAT} and a kind in {list(kinds)}"
        )
    return record


# --------------------------------------------------------------------------------------
# Audio: the interface
# --------------------------------------------------------------------------------------


class AudioBackbone(nn.Module):
    """Raw waveforms -> frame features with gradients: ``forward(waves, lengths)``.

    ``waves`` (B, S) float32 16 kHz mono in [-1, 1], each clip zero-padded to the batch
    width; ``lengths`` (B,) int64, each clip's own sample count. Clips are cropped to
    ``max_seconds``. Returns ``features`` (B, T, dim) and ``mask`` (B, T) bool, True on each
    clip's own frames (``num_frames``, from its own length); features are zero where the
    mask is False. T = max(1, max frame count). A clip of length 0 (no audio) gets an
    all-False mask and zero features: the fusion model replaces it by its missing token.
    """

    dim: int  # per-frame output size
    frame_rate: float  # output frames per second of audio
    num_layers: int  # transformer layers (the range of freeze_layers)
    max_seconds: float  # clips are cropped to this many seconds
    name: str  # where the weights came from (provenance)
    settings: dict[str, Any]  # what else determines the output (JSON-serialisable)

    @property
    def max_samples(self) -> int:
        return round(self.max_seconds * SAMPLE_RATE)

    def num_frames(self, lengths: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) int64 valid output frames (after the crop)."""
        raise NotImplementedError

    def freeze_feature_encoder(self) -> None:
        """``requires_grad=False`` on the convolutional front end."""
        raise NotImplementedError

    def freeze_layers(self, n: int) -> None:
        """``requires_grad=False`` on the first ``n`` transformer layers and everything
        below them (front end, projection, positions). ``n=0`` freezes nothing; freezing
        is cumulative and never undone by a later call."""
        raise NotImplementedError

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute each transformer layer's activations in the backward pass (train mode)."""
        raise NotImplementedError

    def save_architecture(self, folder: Path) -> None:
        """Write what :func:`rebuild_audio_backbone` needs to rebuild it (no weights)."""
        raise NotImplementedError

    def _check_n(self, n: int) -> int:
        if not isinstance(n, int) or not 0 <= n <= self.num_layers:
            raise ValueError(f"n must be an int in [0, {self.num_layers}] (layers), got {n!r}")
        return n

    def _prepare(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Validate, crop to max_seconds, zero every sample past each clip's own length.

        Returns waves (B, S') float32, lengths (B,) int64 (cropped), valid (B, S') bool.
        """
        lengths = check_waves(waves, lengths).clamp(max=self.max_samples)
        waves = waves[:, : self.max_samples].float()  # (B, S')
        valid = torch.arange(waves.shape[1], device=waves.device) < lengths[:, None]  # (B, S')
        return waves * valid, lengths, valid


def frame_mask(frames: Tensor, width: int) -> Tensor:
    """(B,) frame counts -> (B, width) bool, True on each clip's own frames."""
    return torch.arange(width, device=frames.device) < frames[:, None]


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def hf_checkpointing(model: Any, on: bool) -> None:
    """Activation checkpointing of a transformers model (non-reentrant; train mode only).

    transformers >= 5.x names it ``activation_checkpointing_*`` (the older
    ``gradient_checkpointing_*`` names are deprecated); older versions have only those.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        if not on:
            return
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    new = hasattr(model, "activation_checkpointing_enable")
    if on and new:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
