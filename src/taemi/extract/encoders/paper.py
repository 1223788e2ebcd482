"""The ``paper`` extraction profile: the Hugging Face backbones of TAEMI.md section 3.

- audio, :class:`Wav2Vec2EmotionEncoder`: ``audeering/wav2vec2-large-robust-12-ft-emotion-
  msp-dim`` (J. Wagner et al., "Dawn of the Transformer Era in Speech Emotion Recognition:
  Closing the Valence Gap", IEEE TPAMI 2023, arXiv:2203.07378) -> (T_a, 1027) per clip:
  1024 last hidden states + the arousal/dominance/valence head applied per frame.
- vision, :class:`ViTImageEncoder`: ``google/vit-base-patch16-224-in21k`` (A. Dosovitskiy
  et al., "An Image is Worth 16x16 Words", ICLR 2021) -> (768,) per face image: mean of
  the last hidden state over all tokens.
- text, :class:`GTETextEncoder`: ``Alibaba-NLP/gte-en-mlm-base`` (X. Zhang et al., "mGTE:
  Generalized Long-Context Text Representation and Reranking Models", arXiv:2407.19669)
  -> (768,) CLS vector, at most 128 tokens.
- transcripts, :class:`FasterWhisperRecognizer` (the release: faster-whisper large-v3 for
  train/valid, large-v3-turbo for test) or :class:`HFWhisperRecognizer` (transformers):
  Whisper (A. Radford et al., "Robust Speech Recognition via Large-Scale Weak
  Supervision", ICML 2023, arXiv:2212.04356).

:data:`PAPER_MODELS` lists them with output dims and licences (for the README).

Loading. Every loader takes a hub id or a local directory. Downloads are OFF by default
(``allow_download=False`` -> ``local_files_only=True``): this project runs offline, and a
hub id then only resolves from the local Hugging Face cache (``cache_dir``, default
``huggingface_hub.constants.HF_HUB_CACHE``, i.e. ``$HF_HOME/hub``). Any failure raises
:class:`~taemi.extract.encoders.base.ModelLoadError` naming the model, where it looked and
how to provide it; a checkpoint that leaves any model parameter uninitialised is a failure
too (transformers would otherwise fill it with random values and only warn). Nothing ever
falls back to another model.

Inference runs in eval mode under ``torch.inference_mode``; ``device`` ("cpu", "cuda",
"cuda:1") and ``dtype`` ("float32", "float16", "bfloat16") are options; outputs are float32
numpy arrays whatever the compute dtype.

Importing this module needs ``transformers`` (not a core dependency of taemi).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

try:
    import huggingface_hub
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoTokenizer,
        ViTImageProcessorPil,
        ViTModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
        Wav2Vec2PreTrainedModel,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taemi.extract.encoders.paper needs transformers>=5 and huggingface_hub: "
        "pip install transformers"
    ) from exc

from taemi.extract.encoders.base import SAMPLE_RATE, ModelLoadError

log = logging.getLogger(__name__)

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# The models of the paper profile
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperModel:
    """One row of :data:`PAPER_MODELS` (documentation for the README and ``taemi`` CLI)."""

    role: str  # extraction role (base.py): audio, vision, text, speech_recognition*
    model: str  # default hub id (or faster-whisper size name)
    dim: int | None  # output feature dim (None: a transcript)
    loader: str  # class in this module that loads it
    licence: str  # the model's licence, from its model card
    notes: str  # what the feature is and what loading it needs


PAPER_MODELS: dict[str, PaperModel] = {
    "audio": PaperModel(
        role="audio",
        model="audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim",
        dim=1027,
        loader="Wav2Vec2EmotionEncoder",
        licence="CC BY-NC-SA 4.0 (non-commercial)",
        notes="(T_a, 1027) at 50 frames/s: 1024 last hidden states + arousal, dominance, "
        "valence head applied per frame; first 12 s; per-clip normalisation + attention mask",
    ),
    "vision": PaperModel(
        role="vision",
        model="google/vit-base-patch16-224-in21k",
        dim=768,
        loader="ViTImageEncoder",
        licence="Apache-2.0",
        notes="(768,) per face image: mean of the last hidden state over all 197 tokens "
        "(CLS included); images resized to 224x224 by the model's ViTImageProcessor (PIL)",
    ),
    "text": PaperModel(
        role="text",
        model="Alibaba-NLP/gte-en-mlm-base",
        dim=768,
        loader="GTETextEncoder",
        licence="Apache-2.0",
        notes="(768,) CLS vector of the last hidden state, at most 128 tokens; needs "
        "trust_remote_code=True (architecture code lives in Alibaba-NLP/new-impl, which "
        "must be cached too when offline)",
    ),
    "speech_recognition": PaperModel(
        role="speech_recognition",
        model="large-v3",
        dim=None,
        loader="FasterWhisperRecognizer",
        licence="MIT",
        notes="release: faster-whisper large-v3 (Systran/faster-whisper-large-v3) for the "
        "train/valid transcripts; transformers alternative: HFWhisperRecognizer with "
        "openai/whisper-large-v3",
    ),
    "speech_recognition_test": PaperModel(
        role="speech_recognition",
        model="large-v3-turbo",
        dim=None,
        loader="FasterWhisperRecognizer",
        licence="MIT",
        notes="release: faster-whisper large-v3-turbo (mobiuslabsgmbh/faster-whisper-large-"
        "v3-turbo) for the test transcripts; transformers: openai/whisper-large-v3-turbo",
    ),
}


# --------------------------------------------------------------------------------------
# Locating a model: hub id or local directory; turning failures into ModelLoadError
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLocation:
    """Where a model is looked for: a local directory, or a hub id in a HF cache."""

    source: str  # as the caller gave it (recorded as the encoder's ``name``)
    local_dir: Path | None  # the directory, for a local model; None for a hub id
    cache_dir: Path  # the Hugging Face hub cache searched for a hub id

    @property
    def target(self) -> str:
        """What to hand to ``from_pretrained``."""
        return str(self.local_dir) if self.local_dir is not None else self.source

    def looked_in(self) -> str:
        if self.local_dir is not None:
            return f"local directory {self.local_dir}"
        return f"the Hugging Face cache {self.cache_dir} (hub id; no local directory of that name)"

    def how_to_fix(self, allow_download: bool, files: str = "config.json and the weights") -> str:
        if self.local_dir is not None:
            return (
                f"Check that {self.local_dir} holds the model's {files}, e.g. as written by "
                "`hf download <hub id> --local-dir DIR` (huggingface_hub's CLI; "
                "`huggingface-cli download` in huggingface_hub<1)."
            )
        offline = (
            "Downloads are off (allow_download=False; this project runs offline). "
            if not allow_download
            else "Downloading it failed. "
        )
        return (
            offline + f"On a machine with internet run `hf download {self.source} --local-dir DIR` "
            "(`huggingface-cli download` in huggingface_hub<1), copy DIR here and pass DIR "
            "instead of the hub id; or copy a Hugging Face cache that holds the model and "
            "point HF_HOME (or HF_HUB_CACHE, or cache_dir=) at it; or pass "
            "allow_download=True where the hub is reachable."
        )

    def error(
        self, allow_download: bool, cause: BaseException | None = None, *, how_to_fix: str = ""
    ) -> ModelLoadError:
        return ModelLoadError(
            self.source,
            self.looked_in(),
            how_to_fix or self.how_to_fix(allow_download),
            cause=cause,
        )


def _looks_like_path(source: str) -> bool:
    """A string that can only be a filesystem path, not a hub id ("org/name" or "name")."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or "\\" in source
        or source.count("/") > 1
    )


def locate(
    source: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None
) -> ModelLocation:
    """Decide whether ``source`` is a local directory or a hub id.

    An existing directory is local; a missing path that cannot be a hub id (absolute,
    starting with ``.``/``~``, or with more than one ``/``) raises ModelLoadError; anything
    else is a hub id looked up in ``cache_dir`` (default: huggingface_hub's HF_HUB_CACHE).
    """
    text = os.fspath(source)
    if not text:
        raise ValueError("model source is empty: pass a hub id or a local directory")
    cache = Path(cache_dir if cache_dir is not None else huggingface_hub.constants.HF_HUB_CACHE)
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelLocation(text, path.resolve(), cache)
    if path.exists():
        raise ModelLoadError(
            text, f"{path.resolve()}", "It is a file; pass the directory that holds the model"
        )
    if _looks_like_path(text) or isinstance(source, os.PathLike):
        raise ModelLoadError(
            text,
            f"local directory {path.absolute()}",
            "That directory does not exist; pass an existing model directory or a hub id "
            "(org/name) that is in the Hugging Face cache",
        )
    return ModelLocation(text, None, cache)


# Exceptions from transformers / huggingface_hub / tokenizers that mean "could not load".
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError, json.JSONDecodeError)


def load_wav2vec2_feature_extractor(loc: ModelLocation, allow_download: bool) -> Wav2Vec2FeatureExtractor:
    """The checkpoint's feature extractor; it must take mono audio at :data:`SAMPLE_RATE`, the
    only audio this project feeds a wav2vec2 model (the encoder and the fine-tuned backbone)."""
    fe = _load(loc, allow_download, Wav2Vec2FeatureExtractor.from_pretrained)
    if fe.sampling_rate != SAMPLE_RATE or fe.feature_size != 1:
        raise ModelLoadError(
            loc.source,
            loc.looked_in(),
            f"Its feature extractor expects sampling_rate={fe.sampling_rate}, "
            f"feature_size={fe.feature_size}; taemi feeds wav2vec2 {SAMPLE_RATE} Hz mono",
        )
    return fe


def _load(loc: ModelLocation, allow_download: bool, fn: Callable[..., T], /, **kwargs: Any) -> T:
    """``fn(loc.target, local_files_only=not allow_download, cache_dir=..., **kwargs)``,
    with any loading failure re-raised as ModelLoadError (the cause chained)."""
    try:
        return fn(
            loc.target,
            local_files_only=not allow_download,
            cache_dir=str(loc.cache_dir),
            **kwargs,
        )
    except ModelLoadError:
        raise
    except _LOAD_ERRORS as exc:
        raise loc.error(allow_download, exc) from exc


def _load_model(loc: ModelLocation, allow_download: bool, cls: Any, /, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` that refuses checkpoints leaving parameters uninitialised
    (transformers would fill them with random values and only log a warning)."""
    model, info = _load(
        loc, allow_download, cls.from_pretrained, output_loading_info=True, **kwargs
    )
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(m) for m in info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ModelLoadError(
            loc.source,
            loc.looked_in(),
            f"The checkpoint does not fit {cls.__name__}: "
            + (
                f"missing parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                if missing
                else ""
            )
            + (f"wrong shapes {mismatched[:8]}; " if mismatched else "")
            + "it is not the expected model (nothing is randomly initialised in its place).",
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        log.info(
            "%s: %d checkpoint tensors not used: %s", loc.source, len(unexpected), unexpected[:8]
        )
    return model


def _load_config(
    loc: ModelLocation, allow_download: bool, model_type: str | None, **kwargs: Any
) -> Any:
    """The checkpoint's config, loaded first so that a wrong directory fails on it: a
    local directory must hold config.json, and unless ``model_type`` is None the config
    must be of that type (e.g. a ViT directory given as the audio model would otherwise
    half-load and fail obscurely)."""
    if loc.local_dir is not None and not (loc.local_dir / "config.json").is_file():
        raise ModelLoadError(
            loc.source, loc.looked_in(), "There is no config.json in it. " + loc.how_to_fix(False)
        )
    config = _load(loc, allow_download, AutoConfig.from_pretrained, **kwargs)
    if model_type is not None and config.model_type != model_type:
        raise ModelLoadError(
            loc.source,
            loc.looked_in(),
            f"Its config.json says model_type {config.model_type!r}; this encoder needs a "
            f"{model_type!r} checkpoint",
        )
    return config


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, torch.dtype):
        if dtype not in allowed.values():
            raise ValueError(f"dtype {dtype} not supported; use one of {sorted(allowed)}")
        return dtype
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(allowed)}")
    return allowed[dtype]


def _torch_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _revision(config: Any) -> str | None:
    """The hub commit a model was loaded from (None for a local directory)."""
    return getattr(config, "_commit_hash", None)


# --------------------------------------------------------------------------------------
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
    per clip); TAEMI instead applies the head to EVERY frame (spec section 3), which is
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
    """Audio frames of TAEMI.md section 3: (T_i, hidden + 3) per clip.

    Per clip: the first ``max_seconds`` of 16 kHz mono audio (12 s in the paper; None keeps
    everything), normalised by the checkpoint's own Wav2Vec2FeatureExtractor over the
    clip's own samples (zero mean, unit variance; ``do_normalize`` in its
    preprocessor_config.json), then zero-padded into a batch with an attention mask.
    Output: last hidden states (T_i, H) concatenated with the regression head applied per
    frame (T_i, 3) -> (T_i, H + 3) = (T_i, 1027) for the paper model, ~50 frames/s.
    T_i = ``model._get_feat_extract_output_lengths(S_i)`` from the clip's own sample
    count, never from the padded length (spec section 8).

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
        source: str | os.PathLike[str] = PAPER_MODELS["audio"].model,
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
        self.device = _torch_device(device)
        self.dtype = _torch_dtype(dtype)
        self.batch_size = _check_batch_size(batch_size)
        self.max_seconds = max_seconds
        loc = locate(source, cache_dir)
        config = _load_config(loc, allow_download, "wav2vec2")
        self.feature_extractor = load_wav2vec2_feature_extractor(loc, allow_download)
        self.model: Wav2Vec2EmotionModel = _load_model(
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
        if (rev := _revision(config)) is not None:
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
# Vision: ViT-B/16 pre-trained on ImageNet-21k
# --------------------------------------------------------------------------------------


class ViTImageEncoder:
    """One vector per face image: the mean of ViT's last hidden state over ALL tokens.

    "Mean of the last hidden state over tokens" (spec section 3) is taken literally: the
    CLS token and all 196 patch tokens (224 / 16 = 14 x 14) are averaged, i.e.
    ``last_hidden_state.mean(dim=1)`` (the final layer norm is part of ViTModel's last
    hidden state). The pooler (``add_pooling_layer=False``) is not used; its checkpoint
    tensors are ignored.

    Preprocessing is the checkpoint's own ViTImageProcessor configuration run on the PIL
    backend (``ViTImageProcessorPil``): resize to the model's size (224 x 224, bilinear,
    aspect ratio NOT kept, as the original processor does), rescale to [0, 1], normalise
    with mean = std = 0.5. The PIL backend is chosen explicitly so the numbers do not
    depend on whether torchvision happens to be installed (transformers 5 otherwise picks
    a torchvision backend when it is).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = PAPER_MODELS["vision"].model,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        self.device = _torch_device(device)
        self.dtype = _torch_dtype(dtype)
        self.batch_size = _check_batch_size(batch_size)
        loc = locate(source, cache_dir)
        config = _load_config(loc, allow_download, "vit")
        self.processor: ViTImageProcessorPil = _load(
            loc, allow_download, ViTImageProcessorPil.from_pretrained
        )
        self.model: ViTModel = _load_model(
            loc, allow_download, ViTModel, config=config, add_pooling_layer=False, dtype=self.dtype
        )
        self.model.to(self.device).eval()
        self.name = loc.source
        self.dim = int(self.model.config.hidden_size)
        self.settings: dict[str, Any] = {
            "pooling": "mean over all tokens (CLS + patches) of the last hidden state",
            "image_size": self.model.config.image_size,
            "processor": "ViTImageProcessorPil",
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if (rev := _revision(self.model.config)) is not None:
            self.settings["revision"] = rev

    @staticmethod
    def _check(images: list[np.ndarray]) -> list[np.ndarray]:
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of (H, W, 3) uint8 arrays, got {type(images)}")
        for i, im in enumerate(images):
            if (
                not isinstance(im, np.ndarray)
                or im.dtype != np.uint8
                or im.ndim != 3
                or im.shape[2] != 3
            ):
                raise ValueError(
                    f"image {i}: expected an RGB uint8 array (H, W, 3), got "
                    f"{getattr(im, 'shape', type(im))} {getattr(im, 'dtype', '')}"
                )
            if im.shape[0] < 1 or im.shape[1] < 1:
                raise ValueError(f"image {i}: empty image of shape {im.shape}")
        return list(images)

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images (H, W, 3), any size -> (N, dim) float32."""
        images = self._check(images)
        out = np.zeros((len(images), self.dim), dtype=np.float32)  # (N, D)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = self.processor(
                images=chunk, return_tensors="pt"
            ).pixel_values  # (b, 3, 224, 224)
            hidden = self.model(pixels.to(self.device, self.dtype)).last_hidden_state  # (b, 1+P, D)
            out[start : start + len(chunk)] = hidden.float().mean(dim=1).cpu().numpy()  # (b, D)
        return out


# --------------------------------------------------------------------------------------
# Text: GTE (English, MLM-pretrained, base size)
# --------------------------------------------------------------------------------------


def _read_config_json(loc: ModelLocation) -> dict[str, Any] | None:
    """The model's config.json if it can be found without downloading, else None."""
    if loc.local_dir is not None:
        path: Path | None = loc.local_dir / "config.json"
    else:
        hit = huggingface_hub.try_to_load_from_cache(
            loc.source, "config.json", cache_dir=str(loc.cache_dir)
        )
        path = Path(hit) if isinstance(hit, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(loc.source, str(path), "config.json is unreadable", cause=exc) from exc


def refuse_remote_code(loc: ModelLocation, trust_remote_code: bool) -> None:
    """ModelLoadError when ``loc``'s config.json has an ``auto_map`` (its architecture is
    code shipped with the model) and ``trust_remote_code`` is off: the author's code is
    never silently replaced by a built-in class, nor run without being asked for."""
    raw = _read_config_json(loc)
    if raw is not None and raw.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            loc.source,
            loc.looked_in(),
            f"Its config.json has an auto_map ({raw['auto_map']}): the architecture "
            f"(model_type {raw.get('model_type')!r}) is defined by code shipped with the "
            "model. Pass trust_remote_code=True to run that code (only for a model you "
            "trust; offline, the code repository it names must be cached or its files "
            "placed in the model directory).",
        )


class GTETextEncoder:
    """Sentence vectors for transcripts: the CLS vector of the last hidden state.

    Texts are tokenised by the checkpoint's own tokenizer with its special tokens, truncated
    to ``max_tokens`` (128 in the paper, special tokens included) and padded per batch;
    ``t = last_hidden_state[:, 0]`` (spec section 3). Optional token states are each text's
    (T_i, D) last hidden states over its own tokens (CLS and SEP included, padding
    removed). An empty or whitespace-only text raises ValueError: the caller records the
    text modality as missing instead.

    ``Alibaba-NLP/gte-en-mlm-base`` has a custom architecture (``model_type: "new"``)
    whose code lives on the hub (its config's ``auto_map`` points to
    ``Alibaba-NLP/new-impl``). Running it means executing that code, so it needs
    ``trust_remote_code=True``, explicitly; offline, the code repository must be in the
    cache (or the code files in the local directory) as well. Any checkpoint whose config
    carries an ``auto_map`` is refused without it, even when transformers knows its
    model_type, so that the author's code is never silently replaced by a built-in class.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = PAPER_MODELS["text"].model,
        *,
        max_tokens: int = 128,
        trust_remote_code: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2 (room for CLS), got {max_tokens!r}")
        self.device = _torch_device(device)
        self.dtype = _torch_dtype(dtype)
        self.batch_size = _check_batch_size(batch_size)
        self.max_tokens = max_tokens
        loc = locate(source, cache_dir)
        refuse_remote_code(loc, trust_remote_code)
        common = {"trust_remote_code": trust_remote_code}
        config = _load_config(loc, allow_download, None, **common)
        self.tokenizer = _load(loc, allow_download, AutoTokenizer.from_pretrained, **common)
        # t = h[:, 0] needs the CLS token first in every row: right padding, CLS prepended
        self.tokenizer.padding_side = "right"
        first = self.tokenizer("a")["input_ids"][0]
        cls_id = self.tokenizer.cls_token_id
        if cls_id is None or first != cls_id:
            raise ModelLoadError(
                loc.source,
                loc.looked_in(),
                f"Its tokenizer does not start a text with a CLS token (cls_token_id={cls_id}, "
                f"first id {first}); the CLS-vector pooling of this encoder needs one",
            )
        # no pooler: only the last hidden state is used (GTE's NewModel and BERT-like
        # models take add_pooling_layer; GTE's default is already False)
        self.model = _load_model(
            loc,
            allow_download,
            AutoModel,
            config=config,
            add_pooling_layer=False,
            dtype=self.dtype,
            **common,
        )
        self.model.to(self.device).eval()
        self.name = loc.source
        self.dim = int(self.model.config.hidden_size)
        self.settings: dict[str, Any] = {
            "pooling": "CLS (last_hidden_state[:, 0])",
            "max_tokens": max_tokens,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if (rev := _revision(self.model.config)) is not None:
            self.settings["revision"] = rev

    @torch.inference_mode()
    def encode(
        self, texts: list[str], *, token_states: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Texts -> ((N, dim) float32 CLS vectors, per text (T_i, dim) token states or None)."""
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts)}")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(
                f"texts {bad} are empty or not str; an empty transcript means the text "
                "modality is missing: leave those clips out"
            )
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, D)
        states: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            enc = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state.float().cpu()  # (b, L, D)
            vectors[start : start + len(chunk)] = hidden[:, 0].numpy()  # (b, D)
            if token_states:
                mask = enc["attention_mask"].bool().cpu()  # (b, L)
                for row, keep in zip(hidden, mask):
                    states.append(row[keep].numpy())  # (T_i, D), a copy (boolean index)
        return vectors, (states if token_states else None)


# --------------------------------------------------------------------------------------
# Transcripts: Whisper through transformers, or faster-whisper (CTranslate2)
# --------------------------------------------------------------------------------------

_WHISPER_WINDOW_S = 30  # Whisper's input window; longer audio is transcribed window by window


class HFWhisperRecognizer:
    """English transcripts with transformers' WhisperForConditionalGeneration.

    ``language="en"``, ``task="transcribe"`` for multilingual checkpoints (English-only
    ``*.en`` checkpoints take neither); greedy decoding with ``num_beams=1``, beam search
    above. Audio up to 30 s is one window; longer audio goes through transformers'
    sequential long-form decoding (timestamps on, the text only is returned).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = "openai/whisper-large-v3",
        *,
        num_beams: int = 1,
        max_new_tokens: int = 128,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self.device = _torch_device(device)
        self.dtype = _torch_dtype(dtype)
        loc = locate(source, cache_dir)
        config = _load_config(loc, allow_download, "whisper")
        self.processor: WhisperProcessor = _load(
            loc, allow_download, WhisperProcessor.from_pretrained
        )
        self.model: WhisperForConditionalGeneration = _load_model(
            loc, allow_download, WhisperForConditionalGeneration, config=config, dtype=self.dtype
        )
        self.model.to(self.device).eval()
        gen = self.model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False))
        if self.multilingual and not (
            getattr(gen, "lang_to_id", None) and getattr(gen, "task_to_id", None)
        ):
            raise ModelLoadError(
                loc.source,
                loc.looked_in(),
                "Its generation_config.json lacks lang_to_id/task_to_id, so language='en' "
                "and task='transcribe' cannot be set; provide the checkpoint's "
                "generation_config.json",
            )
        limit = int(config.max_target_positions) - 4  # minus the 4 prompt tokens
        if max_new_tokens > limit:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the decoder's {limit}")
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
        self.name = loc.source
        self.settings: dict[str, Any] = {
            "backend": "transformers",
            "language": "en",
            "multilingual": self.multilingual,  # False: an English-only checkpoint
            "task": "transcribe",
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if (rev := _revision(self.model.config)) is not None:
            self.settings["revision"] = rev

    @torch.inference_mode()
    def transcribe(self, waveform: np.ndarray) -> str:
        """waveform (S,) float at 16 kHz -> transcript ('' when nothing was recognised)."""
        w = np.asarray(waveform)
        if w.ndim != 1 or not np.issubdtype(w.dtype, np.floating) or len(w) == 0:
            raise ValueError(
                f"expected a non-empty 1-D float waveform at {SAMPLE_RATE} Hz, "
                f"got shape {w.shape} dtype {w.dtype}"
            )
        if not np.isfinite(w).all():
            raise ValueError("waveform contains NaN or inf")
        w = w.astype(np.float32, copy=False)
        long_form = len(w) > _WHISPER_WINDOW_S * SAMPLE_RATE
        kwargs: dict[str, Any] = {"sampling_rate": SAMPLE_RATE, "return_tensors": "pt"}
        if long_form:  # keep all the audio: padding to the longest, not truncated to 30 s
            kwargs |= {"truncation": False, "padding": "longest", "return_attention_mask": True}
        inputs = self.processor(w, **kwargs)
        gen: dict[str, Any] = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        if self.multilingual:
            gen |= {"language": "en", "task": "transcribe"}
        if long_form:
            gen |= {
                "return_timestamps": True,
                "attention_mask": inputs.attention_mask.to(self.device),
            }
        features = inputs.input_features.to(self.device, self.dtype)  # (1, n_mels, frames)
        ids = self.model.generate(features, **gen)
        if not isinstance(ids, torch.Tensor):  # dict-like outputs of some generate modes
            ids = ids["sequences"]
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def resolve_faster_whisper(
    model: str | os.PathLike[str],
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A faster-whisper size name ("large-v3"), CTranslate2 hub id or local directory ->
    the local CTranslate2 directory, from the Hugging Face cache unless ``allow_download``.

    Size names stand for faster-whisper's hub ids (``large-v3`` ->
    ``Systran/faster-whisper-large-v3``, ``large-v3-turbo`` ->
    ``mobiuslabsgmbh/faster-whisper-large-v3-turbo``).
    """
    import faster_whisper.utils  # optional backend, imported when used

    text = os.fspath(model)
    # faster-whisper's size table is private; without it no size name is accepted
    sizes: dict[str, str] = getattr(faster_whisper.utils, "_MODELS", {})
    if text in sizes and not Path(text).expanduser().is_dir():
        cache = cache_dir if cache_dir is not None else huggingface_hub.constants.HF_HUB_CACHE
        loc = ModelLocation(sizes[text], None, Path(cache))
    else:
        loc = locate(model, cache_dir)
    if loc.local_dir is not None:
        return loc.local_dir
    try:
        return Path(
            faster_whisper.utils.download_model(
                loc.source, local_files_only=not allow_download, cache_dir=str(loc.cache_dir)
            )
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            text if text == loc.source else f"{text} ({loc.source})",
            loc.looked_in(),
            loc.how_to_fix(allow_download, files="config.json, model.bin and tokenizer.json"),
            cause=exc,
        ) from exc


class FasterWhisperRecognizer:
    """English transcripts with faster-whisper (CTranslate2), as in the release.

    ``model`` is a faster-whisper size name ("large-v3" for the release's train/valid
    transcripts, "large-v3-turbo" for its test transcripts, "base", ...), a hub id of a
    CTranslate2 conversion, or a local CTranslate2 directory; see
    :func:`resolve_faster_whisper`. Loading and decoding are the offline profile's
    (:func:`~.offline.load_whisper`, :class:`~.offline.WhisperRecognizer`: temperature 0,
    no previous-text prompt, no VAD, language "en"), with the beam of faster-whisper's
    own default (5) unless ``beam_size`` says otherwise. ``checksums`` (``{file: sha256}``)
    verifies the files; None skips that (logged by load_whisper).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = PAPER_MODELS["speech_recognition"].model,
        *,
        device: str = "cpu",
        compute_type: str = "default",
        beam_size: int = 5,
        cpu_threads: int = 0,
        checksums: dict[str, str] | None = None,
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        # the offline profile's faster-whisper wrapper, imported here so that the other
        # encoders of this module do not depend on it
        from taemi.extract.encoders.offline import WhisperRecognizer, load_whisper

        folder = resolve_faster_whisper(model, allow_download=allow_download, cache_dir=cache_dir)
        loaded = load_whisper(
            folder,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            checksums=checksums,
        )
        self.recognizer = WhisperRecognizer(loaded, language="en", beam_size=beam_size)
        self.name = os.fspath(model)
        self.settings: dict[str, Any] = {
            **self.recognizer.settings,
            "backend": "faster-whisper",
            "dir": str(folder),
        }

    def transcribe(self, waveform: np.ndarray) -> str:
        """waveform (S,) float at 16 kHz -> transcript ('' when nothing was recognised)."""
        return self.recognizer.transcribe(waveform)


__all__ = [
    "PAPER_MODELS",
    "AudioBatch",
    "EmotionRegressionHead",
    "FasterWhisperRecognizer",
    "GTETextEncoder",
    "HFWhisperRecognizer",
    "ModelLocation",
    "PaperModel",
    "ViTImageEncoder",
    "Wav2Vec2EmotionEncoder",
    "Wav2Vec2EmotionModel",
    "locate",
    "resolve_faster_whisper",
]
