"""Backbones + the TAEMI fusion model, trained end to end (docs/method.md sections 3 and 6).

Data flow for one :class:`~taemi.finetune.data.FinetuneBatch` of B clips::

    waves (B, S) + lengths (B,) --audio backbone--> A (B, T_a, D_a), mask (B, T_a)
    transcripts (B)  --tokenizer--> ids (B, L) --text backbone--> t (B, D_t)
    vision (B, T_v, D_v) from the feature store
    -> taemi.data.batch.Batch -> TAEMI (the same fusion code as frozen mode) -> (B, E)

The backbones decide ``model.audio_dim``/``text_dim`` when training starts
(:func:`taemi.train.modes.backbone_sizes`).

The backbones only see clips that have the modality: clips without audio (or without a
transcript) are left out of the backbone's batch, and the fusion model gets its usual
missing flag for them and substitutes its learned missing token (docs/method.md section 5).
Modality dropout stays inside the fusion model, as in frozen mode.

Weights: ``state_dict`` keys are ``audio.*``, ``text.*`` and ``fusion.*`` (the fusion
model's own keys under ``fusion.``). A run folder also keeps each backbone's
architecture (``RUN/backbones/audio``, ``RUN/backbones/text``: configs and tokenizer, no
weights) so :func:`load_finetune_model` rebuilds the model from the run folder alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from taemi.config import RunConfig
from taemi.data.batch import Batch
from taemi.finetune.data import FinetuneBatch
from taemi.model.taemi import TAEMI

log = logging.getLogger(__name__)

BACKBONES_DIR = "backbones"


class FinetuneModel(nn.Module):
    """Audio backbone + text backbone + fusion model; ``forward(batch) -> (B, E)``."""

    def __init__(self, audio: nn.Module, text: nn.Module, fusion: TAEMI):
        super().__init__()
        if audio.dim != fusion.dims["audio"] or text.dim != fusion.dims["text"]:
            raise ValueError(
                f"backbone sizes (audio {audio.dim}, text {text.dim}) differ from the fusion model's inputs "
                f"(model.audio_dim={fusion.dims['audio']}, model.text_dim={fusion.dims['text']})"
            )
        self.audio = audio
        self.text = text
        self.fusion = fusion

    @property
    def dims(self) -> dict[str, int]:
        return self.fusion.dims

    @property
    def num_outputs(self) -> int:
        return self.fusion.num_outputs

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in (*self.audio.parameters(), *self.text.parameters()) if p.requires_grad]

    def fusion_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.fusion.parameters() if p.requires_grad]

    def _audio(self, batch: FinetuneBatch) -> tuple[Tensor, Tensor]:
        """-> A (B, T_a, D_a), mask (B, T_a); rows of clips without audio are one zero step."""
        B = len(batch)
        have = ~batch.missing[:, 0]  # (B,)
        if not bool(have.any()):
            dev = batch.waves.device
            return torch.zeros(B, 1, self.dims["audio"], device=dev), torch.zeros(
                B, 1, dtype=torch.bool, device=dev
            )
        if bool(have.all()):
            return self.audio(batch.waves, batch.wave_lengths)  # (B, T_a, D_a), (B, T_a)
        idx = have.nonzero().squeeze(1)  # (B',)
        lengths = batch.wave_lengths[idx]
        waves = batch.waves[
            idx, : int(lengths.max())
        ]  # (B', S') trimmed to the longest present clip
        feats, mask = self.audio(waves, lengths)  # (B', T, D), (B', T)
        out = feats.new_zeros(B, feats.shape[1], feats.shape[2])  # (B, T, D)
        out_mask = mask.new_zeros(B, mask.shape[1])  # (B, T)
        return out.index_put((idx,), feats), out_mask.index_put((idx,), mask)

    def _text(self, batch: FinetuneBatch) -> Tensor:
        """-> t (B, D_t); rows of clips without a transcript are zeros (replaced by the token)."""
        B = len(batch)
        have = [i for i in range(B) if not bool(batch.missing[i, 2])]
        dev = batch.vision.device
        if not have:
            return torch.zeros(B, self.dims["text"], device=dev)
        tokens = self.text.tokenize(
            [batch.texts[i] for i in have]
        )  # input_ids, attention_mask (B', L)
        vec = self.text(**{k: v.to(dev) for k, v in tokens.items()})  # (B', D_t)
        if len(have) == B:
            return vec
        idx = torch.tensor(have, device=dev)
        return vec.new_zeros(B, vec.shape[1]).index_put((idx,), vec)

    def forward(self, batch: FinetuneBatch) -> Tensor:
        audio, audio_mask = self._audio(batch)
        fused = Batch(
            audio=audio,
            audio_mask=audio_mask,
            vision=batch.vision,
            vision_mask=batch.vision_mask,
            text=self._text(batch),
            missing=batch.missing,
            target=batch.target,
            ids=batch.ids,
        )
        return self.fusion(fused)  # (B, E)


def load_backbones(cfg: RunConfig) -> tuple[nn.Module, nn.Module]:
    """The configured backbones with their pretrained weights, freezing and checkpointing applied."""
    from taemi.backbones.profiles import load_audio_backbone
    from taemi.backbones.text import load_text_backbone

    ft = cfg.finetune
    audio = load_audio_backbone(
        ft.audio_backbone,
        window=ft.audio_window,
        max_seconds=ft.max_audio_seconds,
        allow_download=ft.allow_download,
    )
    text = load_text_backbone(
        ft.text_backbone,
        pooling=ft.text_pooling,
        max_tokens=ft.max_text_tokens,
        trust_remote_code=ft.trust_remote_code,
        allow_download=ft.allow_download,
    )
    configure_backbones(cfg, audio, text)
    return audio, text


def configure_backbones(cfg: RunConfig, audio: nn.Module, text: nn.Module) -> None:
    """Apply the freezing and gradient-checkpointing settings of ``cfg.finetune``."""
    ft = cfg.finetune
    if ft.freeze_feature_encoder:
        audio.freeze_feature_encoder()
    if ft.freeze_audio_layers:
        audio.freeze_layers(ft.freeze_audio_layers)
    if ft.freeze_text_layers:
        text.freeze_layers(ft.freeze_text_layers)
    audio.set_gradient_checkpointing(ft.gradient_checkpointing)
    text.set_gradient_checkpointing(ft.gradient_checkpointing)


def save_backbone_architectures(model: FinetuneModel, run_dir: str | Path) -> None:
    folder = Path(run_dir) / BACKBONES_DIR
    model.audio.save_architecture(folder / "audio")
    model.text.save_architecture(folder / "text")


def load_finetune_model(run_dir: str | Path, cfg: RunConfig) -> FinetuneModel:
    """The run's model architecture (backbones from ``RUN/backbones``), weights not loaded."""
    from taemi.backbones.profiles import rebuild_audio_backbone
    from taemi.backbones.text import rebuild_text_backbone

    folder = Path(run_dir) / BACKBONES_DIR
    for role in ("audio", "text"):
        if not (folder / role).is_dir():
            raise FileNotFoundError(
                f"{run_dir} is a fine-tuning run but {folder / role} is missing: it holds the {role} "
                "backbone's architecture (config, tokenizer) that the weights belong to"
            )
    audio = rebuild_audio_backbone(folder / "audio")
    text = rebuild_text_backbone(folder / "text")
    return FinetuneModel(audio, text, TAEMI(cfg.model, num_outputs=len(cfg.data.emotions)))
