"""The wav2vec2 emotion model: frozen audio encoder and trainable backbone.

``audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim`` (J. Wagner et al., "Dawn of the
Transformer Era in Speech Emotion Recognition: Closing the Valence Gap", IEEE TPAMI 2023,
arXiv:2203.07378), the paper profile's audio backbone (docs/method.md section 3):
(T_a, 1027) per clip, the 1024 last hidden states joined with the arousal/dominance/valence
regression head applied per frame.

- :class:`Wav2Vec2EmotionModel`: transformers' ``Wav2Vec2Model`` + audeering's regression
  head, laid out like the checkpoint so that ``from_pretrained`` loads it as published.
- :class:`Wav2Vec2EmotionEncoder`: the frozen encoder (extraction, ``inference_mode``).
- :class:`Wav2Vec2Backbone`: the same features with gradients, for end-to-end
  fine-tuning (docs/method.md section 6; :func:`load_wav2vec2_backbone`,
  :func:`rebuild_wav2vec2_backbone`).
- :func:`load_wav2vec2_feature_extractor`: the checkpoint's feature extractor, refused
  unless it takes 16 kHz mono.

Weights are located by :mod:`taemi.backbones.weights` (hub id or local directory; no
download unless ``allow_download``). Importing this module needs ``transformers``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
        Wav2Vec2PreTrainedModel,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taemi.backbones.wav2vec2 needs transformers>=5: pip install transformers"
    ) from exc

from taemi.backbones.base import (
    SAMPLE_RATE,
    ModelLoadError,
    as_torch_device,
    as_torch_dtype,
    check_batch_size,
)
from taemi.backbones.trainable import (
    AudioBackbone,
    frame_mask,
    freeze,
    hf_checkpointing,
    write_architecture,
)
from taemi.backbones.weights import (
    WAV2VEC2_EMOTION,
    ModelLocation,
    hub_revision,
    load_config,
    load_model,
    load_pretrained,
    locate,
)

log = logging.getLogger(__name__)


def load_wav2vec2_feature_extractor(
    loc: ModelLocation, allow_download: bool
) -> Wav2Vec2FeatureExtractor:
    """The checkpoint's feature extractor; it must take mono audio at :data:`SAMPLE_RATE`, the
    only audio this project feeds a wav2vec2 model (the encoder and the fine-tuned backbone)."""
    fe = load_pretrained(loc, allow_download, Wav2Vec2FeatureExtractor.from_pretrained)
    if fe.sampling_rate != SAMPLE_RATE or fe.feature_size != 1:
        raise ModelLoadError(
            loc.source,
            loc.looked_in(),
            f"Its feature extractor expects sampling_rate={fe.sampling_rate}, "
            f"feature_size={fe.feature_size}; taemi feeds wav2vec2 {SAMPLE_RATE} Hz mono",
        )
    return fe


# Audio: wav2vec2-large-robust-12 fine-tuned on MSP-Podcast for arousal/dominance/valence
# --------------------------------------------------------------------------------------


def conv_receptive_field(config: Wav2Vec2Config) -> int:
    """Samples the wav2vec2 conv feature encoder needs for its first output frame."""
    need = 1
    for k, s in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        need = (need - 1) * s + k
    return need


class EmotionRegressionHead(nn.Module):
    """audeering's regression head: dropout -> dense -> tanh -> dropout -> out_proj.

    Parameter names ``dense`` / ``out_proj`` match the checkpoint (``classifier.dense.*``,
    ``classifier.out_proj.*``). Shapes: (..., H) -> (..., num_labels); the checkpoint has
    3 labels in the order arousal, dominance, valence (its config's id2label).
    """

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.final_dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features)  # (..., H)
        x = torch.tanh(self.dense(x))  # (..., H)
        x = self.dropout(x)
        return self.out_proj(x)  # (..., num_labels)


class Wav2Vec2EmotionModel(Wav2Vec2PreTrainedModel):
    """Wav2Vec2Model + :class:`EmotionRegressionHead`, laid out like audeering's checkpoint
    (``wav2vec2.*``, ``classifier.*``) so ``from_pretrained`` loads it as published.

    The model card pools the hidden states over time before the head (one A/D/V triple
    per clip); TAEMI instead applies the head to EVERY frame (docs/method.md section 3), which is
    what :meth:`forward` returns.
    """

    def __init__(self, config: Wav2Vec2Config):
        super().__init__(config)
        self.wav2vec2 = Wav2Vec2Model(config)
        self.classifier = EmotionRegressionHead(config)
        self.post_init()

    def forward(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_values (B, S), attention_mask (B, S) or None ->
        (hidden (B, T, H), per-frame regression (B, T, num_labels))."""
        hidden = self.wav2vec2(input_values, attention_mask=attention_mask).last_hidden_state
        return hidden, self.classifier(hidden)  # (B, T, H), (B, T, 3)


@dataclass(frozen=True)
class AudioBatch:
    """Model inputs for a list of clips (see :meth:`Wav2Vec2EmotionEncoder.prepare`)."""

    input_values: torch.Tensor  # (B, S_max) float32, each clip normalised then zero-padded
    attention_mask: torch.Tensor  # (B, S_max) int64, 1 on each clip's own samples
    num_samples: torch.Tensor  # (B,) int64, S_i after the max_seconds crop
    num_frames: torch.Tensor  # (B,) int64, T_i = conv-stack output length of S_i


class Wav2Vec2EmotionEncoder:
    """Audio frames of docs/method.md section 3: (T_i, hidden + 3) per clip.

    Per clip: the first ``max_seconds`` of 16 kHz mono audio (12 s in the paper; None keeps
    everything), normalised by the checkpoint's own Wav2Vec2FeatureExtractor over the
    clip's own samples (zero mean, unit variance; ``do_normalize`` in its
    preprocessor_config.json), then zero-padded into a batch with an attention mask.
    Output: last hidden states (T_i, H) concatenated with the regression head applied per
    frame (T_i, 3) -> (T_i, H + 3) = (T_i, 1027) for the paper model, ~50 frames/s.
    T_i = ``model._get_feat_extract_output_lengths(S_i)`` from the clip's own sample
    count, never from the padded length (docs/method.md section 8).

    Padding. With ``feat_extract_norm == "layer"`` (the large-robust model) every norm in
    the conv stack works per time step, the conv frames counted in T_i see only the
    clip's own samples, and the encoder zeroes padded frames and masks them out of
    attention when given the attention mask: a padded batch gives each clip exactly the
    output it gets alone, so the mask is passed. With ``"group"`` (wav2vec2-base style)
    the first conv layer's GroupNorm normalises over the whole padded time axis, so
    padding changes every frame whether or not a mask is passed (transformers documents
    that such models must not get one); those models are run one clip per forward pass,
    unpadded, so a clip's features never depend on its batch-mates.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = WAV2VEC2_EMOTION,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 8,
        max_seconds: float | None = 12.0,
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds!r}")
        self.device = as_torch_device(device)
        self.dtype = as_torch_dtype(dtype)
        self.batch_size = check_batch_size(batch_size)
        self.max_seconds = max_seconds
        loc = locate(source, cache_dir)
        config = load_config(loc, allow_download, "wav2vec2")
        self.feature_extractor = load_wav2vec2_feature_extractor(loc, allow_download)
        self.model: Wav2Vec2EmotionModel = load_model(
            loc, allow_download, Wav2Vec2EmotionModel, config=config, dtype=self.dtype
        )
        self.model.to(self.device).eval()
        config = self.model.config
        self.pass_attention_mask = config.feat_extract_norm == "layer"
        if not self.pass_attention_mask:
            log.info(
                "%s: feat_extract_norm=%r, clips are encoded one at a time (see class doc)",
                loc.source,
                config.feat_extract_norm,
            )
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.name = loc.source
        self.dim = config.hidden_size + config.num_labels
        self.frame_rate = SAMPLE_RATE / math.prod(config.conv_stride)
        self.settings: dict[str, Any] = {
            "max_seconds": max_seconds,
            "normalize": bool(self.feature_extractor.do_normalize),
            "head": "per-frame",
            "head_labels": self.labels,
            "attention_mask": self.pass_attention_mask,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if (rev := hub_revision(config)) is not None:
            self.settings["revision"] = rev

    def _check(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Validate, crop to max_seconds; (S_i,) float32 each."""
        if not isinstance(waveforms, (list, tuple)):
            raise TypeError(f"waveforms must be a list of 1-D arrays, got {type(waveforms)}")
        limit = None if self.max_seconds is None else round(self.max_seconds * SAMPLE_RATE)
        out = []
        for i, w in enumerate(waveforms):
            w = np.asarray(w)
            if w.ndim != 1 or not np.issubdtype(w.dtype, np.floating):
                raise ValueError(
                    f"waveform {i}: expected 1-D float samples at {SAMPLE_RATE} Hz, "
                    f"got shape {w.shape} dtype {w.dtype}"
                )
            if limit is not None:
                w = w[:limit]
            if not np.isfinite(w).all():
                raise ValueError(f"waveform {i}: contains NaN or inf")
            out.append(w.astype(np.float32, copy=False))
        return out

    def num_frames(self, num_samples: list[int] | torch.Tensor) -> torch.Tensor:
        """(B,) sample counts -> (B,) frame counts through the conv stack."""
        lengths = torch.as_tensor(num_samples, dtype=torch.long)
        return self.model._get_feat_extract_output_lengths(lengths).to(torch.long)

    def prepare(self, waveforms: list[np.ndarray]) -> AudioBatch:
        """Crop, normalise each clip over its own samples, zero-pad, mask (no forward pass)."""
        clips = self._check(waveforms)
        if not clips:
            raise ValueError("no waveforms given")
        lengths = torch.tensor([len(c) for c in clips], dtype=torch.long)  # (B,)
        frames = self.num_frames(lengths)  # (B,)
        too_short = [i for i, t in enumerate(frames.tolist()) if t < 1]
        if too_short:
            raise ValueError(
                f"waveforms {too_short} are too short for one frame "
                f"(sample counts {[len(clips[i]) for i in too_short]}; the conv stack needs "
                f"at least {self._min_samples()} samples)"
            )
        batch = torch.zeros(len(clips), int(lengths.max()), dtype=torch.float32)  # (B, S_max)
        mask = torch.zeros(len(clips), int(lengths.max()), dtype=torch.long)  # (B, S_max)
        for i, clip in enumerate(clips):
            # one clip per call: the extractor normalises over exactly this clip's samples
            values = self.feature_extractor(
                clip, sampling_rate=SAMPLE_RATE, return_tensors="np"
            ).input_values[0]  # (S_i,)
            batch[i, : len(clip)] = torch.from_numpy(np.asarray(values, dtype=np.float32))
            mask[i, : len(clip)] = 1
        return AudioBatch(batch, mask, lengths, frames)

    def _min_samples(self) -> int:
        return conv_receptive_field(self.model.config)

    @torch.inference_mode()
    def _forward(self, batch: AudioBatch) -> list[np.ndarray]:
        x = batch.input_values.to(self.device, self.dtype)  # (B, S_max)
        mask = batch.attention_mask.to(self.device) if self.pass_attention_mask else None
        hidden, head = self.model(x, attention_mask=mask)  # (B, T_max, H), (B, T_max, 3)
        feats = torch.cat([hidden, head], dim=-1).float().cpu()  # (B, T_max, H + 3)
        out = []
        for i, t in enumerate(batch.num_frames.tolist()):
            if t > feats.shape[1]:  # cannot happen unless the model's conv stack disagrees
                raise RuntimeError(f"clip {i}: expected {t} frames, model gave {feats.shape[1]}")
            out.append(feats[i, :t].numpy().copy())  # (T_i, H + 3), not a view of the batch
        return out

    def encode(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Waveforms (S_i,) float at 16 kHz -> per clip (T_i, dim) float32."""
        clips = self._check(waveforms)
        if not clips:
            return []
        frames = self.num_frames([len(c) for c in clips])  # (N,)
        if int(frames.min()) < 1:  # fail before any work, not in the last batch
            self.prepare(clips)  # raises ValueError naming the short clips
        step = self.batch_size if self.pass_attention_mask else 1
        # similar lengths together: less padding; the mask makes the result order-free
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            out.update(zip(idx, self._forward(self.prepare([clips[i] for i in idx]))))
        return [out[i] for i in range(len(clips))]


# --------------------------------------------------------------------------------------
# The trainable form
# --------------------------------------------------------------------------------------


class Wav2Vec2Backbone(AudioBackbone):
    """:class:`Wav2Vec2EmotionModel` with gradients: (B, T, hidden + num_labels) per batch.

    Per clip (as :class:`~taemi.backbones.wav2vec2.Wav2Vec2EmotionEncoder` does): the
    first ``max_seconds``, normalised over its OWN samples to zero mean and unit variance
    (``(x - mean) / sqrt(var + 1e-7)``, Wav2Vec2FeatureExtractor's formula) when the
    checkpoint's preprocessor_config says ``do_normalize``, padding left at zero; output
    = last hidden states concatenated with the regression head applied per frame; T_i =
    ``_get_feat_extract_output_lengths(S_i)``. ``feat_extract_norm == "layer"``: one padded
    forward pass with the attention mask; ``"group"``: one forward pass per clip, unpadded
    (see the module docstring). Clips of length 0 are not run.

    ``freeze_feature_encoder`` freezes the conv stack only (transformers'
    ``freeze_feature_encoder``); the feature projection stays trainable.
    ``freeze_layers(n)``, n >= 1, also freezes the feature projection, the masked-frame
    embedding, the convolutional position embedding (and, in the post-norm variant, the
    encoder layer norm applied before the layers) and the first n layers. SpecAugment
    masking (``mask_time_prob``, ``mask_feature_prob``) applies in train mode when the
    config enables it (``apply_spec_augment``), as in transformers' fine-tuning, except
    that a sequence shorter than ``mask_time_length`` frames gets no time mask (where
    transformers raises); without time masking the masked-frame embedding is never used
    and is frozen (DDP needs a gradient for every trainable parameter).
    """

    def __init__(
        self,
        model: Wav2Vec2EmotionModel,
        *,
        normalize: bool,
        max_seconds: float = 12.0,
        name: str,
        settings: dict[str, Any] | None = None,
        feature_extractor: Wav2Vec2FeatureExtractor | None = None,
    ):
        super().__init__()
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
        config = model.config
        if config.layerdrop:
            raise ValueError(
                f"config.layerdrop is {config.layerdrop}; set it to 0 for fine-tuning (a "
                "dropped layer gets no gradient, which DistributedDataParallel rejects)"
            )
        self.model = model
        self.normalize = bool(normalize)
        self.max_seconds = float(max_seconds)
        self.feature_extractor = feature_extractor or Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=SAMPLE_RATE,
            do_normalize=self.normalize,
            return_attention_mask=config.feat_extract_norm == "layer",
        )
        self.pass_attention_mask = config.feat_extract_norm == "layer"
        self.dim = config.hidden_size + config.num_labels
        self.frame_rate = SAMPLE_RATE / math.prod(config.conv_stride)
        self.num_layers = config.num_hidden_layers
        self.name = name
        self.settings = {
            "backbone": "wav2vec2 emotion (hidden states + per-frame head)",
            "max_seconds": self.max_seconds,
            "normalize": self.normalize,
            "attention_mask": self.pass_attention_mask,
            "layerdrop": 0.0,
            "spec_augment": {
                "time": bool(getattr(config, "apply_spec_augment", True))
                and config.mask_time_prob > 0,
                "feature": bool(getattr(config, "apply_spec_augment", True))
                and config.mask_feature_prob > 0,
            },
            **(settings or {}),
        }
        self._min_samples = conv_receptive_field(model.config)
        w2v = model.wav2vec2
        self._time_masking = self.settings["spec_augment"]["time"]
        if getattr(w2v, "masked_spec_embed", None) is not None and not self._time_masking:
            # never used in forward: a trainable parameter without gradient breaks DDP
            w2v.masked_spec_embed.requires_grad_(False)

    def num_frames(self, lengths: Tensor) -> Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.long).clamp(max=self.max_samples)
        frames = self.model._get_feat_extract_output_lengths(lengths).to(torch.long)
        return torch.where(lengths > 0, frames.clamp(min=0), torch.zeros_like(frames))

    def _normalise(self, waves: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        """(B, S) zero-padded -> (B, S), each clip zero-mean unit-variance over its samples."""
        if not self.normalize:
            return waves
        n = lengths.clamp(min=1).to(waves.dtype)[:, None]  # (B, 1)
        mean = waves.sum(dim=1, keepdim=True) / n  # (B, 1)
        var = ((waves - mean) * valid).pow(2).sum(dim=1, keepdim=True) / n  # (B, 1)
        return (waves - mean) / torch.sqrt(var + 1e-7) * valid  # (B, S)

    def forward(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """waves (B, S), lengths (B,) -> features (B, T, H + 3), mask (B, T) bool."""
        waves, lengths, valid = self._prepare(waves, lengths)
        frames = self.num_frames(lengths)  # (B,)
        short = ((lengths > 0) & (frames < 1)).nonzero().flatten().tolist()
        if short:
            raise ValueError(
                f"clips {short} have {lengths[short].tolist()} samples, too few for one "
                f"frame (the conv stack needs {self._min_samples}); pass length 0 for a clip "
                "without audio"
            )
        x = self._normalise(waves, lengths, valid)  # (B, S')
        run = (lengths > 0).nonzero().flatten().tolist()
        width = max(1, int(frames.max()))
        rows: dict[int, Tensor] = {}
        if self.pass_attention_mask and run:
            s_max = int(lengths[run].max())
            feats = self._run(x[run, :s_max], valid[run, :s_max].long())  # (b, T', H + 3)
            for j, i in enumerate(run):
                rows[i] = feats[j, : int(frames[i])]  # (T_i, H + 3)
        else:
            for i in run:
                rows[i] = self._run(x[i : i + 1, : int(lengths[i])], None)[0]  # (T_i, H + 3)
        for i, row in rows.items():
            if row.shape[0] != int(frames[i]):
                raise RuntimeError(
                    f"clip {i}: the model gave {row.shape[0]} frames, expected {int(frames[i])}"
                )
        dtype = next(iter(rows.values())).dtype if rows else waves.dtype
        empty = waves.new_zeros((0, self.dim), dtype=dtype)
        features = torch.stack(
            [F.pad(rows.get(i, empty), (0, 0, 0, width - int(frames[i]))) for i in range(len(x))]
        )  # (B, T, H + 3), zero past each clip's frames
        return features, frame_mask(frames, width)

    def _run(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(b, S) normalised, (b, S) mask or None -> (b, T', H + 3): Wav2Vec2EmotionModel's
        forward, spelled out to pass ``mask_time_indices``. transformers' SpecAugment
        raises when a sequence is shorter than ``mask_time_length`` frames; such sequences
        (a clip under 0.2 s for the paper model) get no time mask instead."""
        cfg = self.model.config
        no_mask = None
        if self.training and self._time_masking:
            t = int(self.model.wav2vec2._get_feat_extract_output_lengths(x.shape[1]))
            if t < cfg.mask_time_length:
                no_mask = torch.zeros(x.shape[0], t, dtype=torch.bool, device=x.device)
        hidden = self.model.wav2vec2(
            x, attention_mask=attention_mask, mask_time_indices=no_mask
        ).last_hidden_state  # (b, T', H)
        return torch.cat([hidden, self.model.classifier(hidden)], dim=-1)  # (b, T', H + 3)

    def freeze_feature_encoder(self) -> None:
        self.model.wav2vec2.freeze_feature_encoder()

    def freeze_layers(self, n: int) -> None:
        if self._check_n(n) == 0:
            return
        w2v = self.model.wav2vec2
        self.freeze_feature_encoder()
        freeze(w2v.feature_projection)
        if getattr(w2v, "masked_spec_embed", None) is not None:
            w2v.masked_spec_embed.requires_grad_(False)
        freeze(w2v.encoder.pos_conv_embed)
        if not self.model.config.do_stable_layer_norm:  # post-norm: layer_norm before layers
            freeze(w2v.encoder.layer_norm)
        for layer in w2v.encoder.layers[:n]:
            freeze(layer)

    def set_gradient_checkpointing(self, on: bool) -> None:
        hf_checkpointing(self.model, on)

    def save_architecture(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(folder)
        self.feature_extractor.save_pretrained(folder)
        write_architecture(
            folder,
            "wav2vec2",
            {
                "name": self.name,
                "settings": self.settings,
                "normalize": self.normalize,
                "max_seconds": self.max_seconds,
            },
        )


def load_wav2vec2_backbone(
    loc: ModelLocation, *, max_seconds: float, allow_download: bool
) -> Wav2Vec2Backbone:
    config = load_config(loc, allow_download, "wav2vec2")
    fe = load_wav2vec2_feature_extractor(loc, allow_download)
    layerdrop = float(config.layerdrop)
    config.layerdrop = 0.0  # DDP-safe: every layer runs in every step (module docstring)
    model = load_model(
        loc, allow_download, Wav2Vec2EmotionModel, config=config, dtype=torch.float32
    )
    settings: dict[str, Any] = {"layerdrop_of_checkpoint": layerdrop}
    if (rev := hub_revision(config)) is not None:
        settings["revision"] = rev
    return Wav2Vec2Backbone(
        model,
        normalize=bool(fe.do_normalize),
        max_seconds=max_seconds,
        name=loc.source,
        settings=settings,
        feature_extractor=fe,
    )


def rebuild_wav2vec2_backbone(folder: Path, record: dict[str, Any]) -> Wav2Vec2Backbone:
    """The backbone of a :meth:`Wav2Vec2Backbone.save_architecture` folder (its
    ``backbone.json`` ``record`` already read), randomly initialised."""
    config = Wav2Vec2Config.from_pretrained(folder, local_files_only=True)
    fe = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
    return Wav2Vec2Backbone(
        Wav2Vec2EmotionModel(config),
        normalize=record["normalize"],
        max_seconds=record["max_seconds"],
        name=record["name"],
        settings=record["settings"],
        feature_extractor=fe,
    )
