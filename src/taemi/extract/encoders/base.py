"""One small interface per role of feature extraction (spec section 3).

An extraction *profile* picks one implementation per role by name:

- :class:`SpeechRecognizer`: 16 kHz mono waveform -> transcript.
- :class:`AudioEncoder`: waveforms -> one (T_i, D_a) frame sequence per clip, T_i derived
  from the clip's OWN sample count (never from the padded batch length; spec section 8).
- :class:`ImageEncoder`: RGB face crops -> one D_v vector per image.
- :class:`TextEncoder`: transcripts -> one D_t vector per text (and optionally its
  token states).

Every encoder reports ``name`` (the model id or path it was loaded from) and
``settings`` (what else determines its output), which the feature store records as
provenance. A model that cannot be loaded raises :class:`ModelLoadError` saying which
model, where it looked and how to provide it; nothing falls back to another model.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000  # Hz, every audio encoder and recogniser takes 16 kHz mono float32


class ModelLoadError(RuntimeError):
    """A pretrained model could not be loaded."""

    def __init__(self, model: str, looked_in: str, how_to_fix: str, cause: BaseException | None = None):
        self.model, self.looked_in, self.how_to_fix = model, looked_in, how_to_fix
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"cannot load model {model!r} (looked in {looked_in}){reason}. {how_to_fix}")


@runtime_checkable
class SpeechRecognizer(Protocol):
    name: str
    settings: dict[str, Any]

    def transcribe(self, waveform: np.ndarray) -> str:
        """waveform (S,) float32 at 16 kHz -> transcript ('' when nothing was recognised)."""
        ...


@runtime_checkable
class AudioEncoder(Protocol):
    name: str
    settings: dict[str, Any]
    dim: int  # D_a
    frame_rate: float  # output frames per second of audio (e.g. 50)

    def encode(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Waveforms (S_i,) float32 at 16 kHz -> per clip (T_i, D_a) float32, T_i from S_i."""
        ...


@runtime_checkable
class ImageEncoder(Protocol):
    name: str
    settings: dict[str, Any]
    dim: int  # D_v

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images (H, W, 3), any size -> (N, D_v) float32."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    name: str
    settings: dict[str, Any]
    dim: int  # D_t
    max_tokens: int

    def encode(self, texts: list[str], *, token_states: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Texts -> ((N, D_t) float32 sentence vectors, per text (T_i, D_t) token states or None)."""
        ...
