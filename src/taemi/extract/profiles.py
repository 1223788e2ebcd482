"""The encoders of an extraction profile: the profile's models
(:func:`taemi.backbones.profiles.load_models`, which says what each profile holds) plus
the face cropper of extraction.

Face crops: OpenCV's Haar frontal-face detector (largest face per frame, square box with
a 25 % margin, 224 x 224) for both profiles; ``face=False`` uses whole frames.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from taemi.backbones.profiles import load_models
from taemi.extract.face import FaceCropper
from taemi.extract.pipeline import Encoders

log = logging.getLogger(__name__)


def load_encoders(
    profile: str = "offline",
    *,
    device: str = "cpu",
    batch_size: int = 8,
    models: Mapping[str, str] | None = None,
    face: bool = True,
    face_detect_every: int = 1,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    image_precision: str = "fp32",
    encoder_precision: str = "fp32",
    whisper_window: float = 30.0,
) -> Encoders:
    """Load every model of ``profile`` once. ``models`` maps a role (asr, audio, vision,
    text) to a hub id or local directory replacing the profile's default.
    ``face_detect_every``: the face detector runs on every k-th frame (FaceCropper's
    ``detect_every``; 1: every frame); a bad value fails before any model loads.
    ``image_precision``: ``"fp32"`` (exact) or ``"int8"`` (offline profile's DINOv2).
    ``device``: ``"cpu"``, ``"cuda"`` or ``"auto"`` (the GPU when every model of the profile
    can use it); ``encoder_precision``: ``"fp32"`` or ``"fp16"`` (GPU only);
    ``whisper_window``: the offline profile's Whisper audio window in seconds (30: exact);
    see :func:`taemi.backbones.profiles.load_models`."""
    if not face and face_detect_every != 1:
        raise ValueError(
            f"face_detect_every={face_detect_every} (--detect-every) needs face crops; "
            "it has no meaning with face=False (--no-face)"
        )
    cropper = FaceCropper(detect_every=face_detect_every) if face else None
    m = load_models(
        profile,
        device=device,
        batch_size=batch_size,
        models=models,
        trust_remote_code=trust_remote_code,
        allow_download=allow_download,
        image_precision=image_precision,
        encoder_precision=encoder_precision,
        whisper_window=whisper_window,
    )
    enc = Encoders(
        asr=m.asr,
        audio=m.audio,
        image=m.image,
        text=m.text,
        face=cropper,
        profile=m.profile,
    )
    log.info(
        "profile %s: asr %s, audio %s (%d), vision %s (%d), text %s (%d), faces %s",
        profile,
        enc.asr.name,
        enc.audio.name,
        enc.audio.dim,
        enc.image.name,
        enc.image.dim,
        enc.text.name,
        enc.text.dim,
        "Haar crops" if face else "whole frames",
    )
    return enc
