"""What every pretrained model of taemi shares: one small interface per role of feature
extraction (docs/method.md section 3), the load error, and small checks.

An extraction *profile* (:mod:`taemi.backbones.profiles`) picks one implementation per role:

- :class:`SpeechRecognizer`: 16 kHz mono waveform -> transcript.
- :class:`AudioEncoder`: waveforms -> one (T_i, D_a) frame sequence per clip, T_i derived
  from the clip's OWN sample count (never from the padded batch length; docs/method.md section 8).
- :class:`ImageEncoder`: RGB face crops -> one D_v vector per image.
- :class:`TextEncoder`: transcripts -> one D_t vector per text (and optionally its
  token states).

Every encoder reports ``name`` (the model id or path it was loaded from) and
``settings`` (what else determines its output), which the feature store records as
provenance (:func:`provenance`). A model that cannot be loaded raises
:class:`ModelLoadError` saying which model, where it looked and how to provide it;
nothing falls back to another model. :func:`refuse_remote_code` keeps a checkpoint's own
architecture code from running (or being replaced by a built-in class) unless asked for.

The trainable forms (``forward`` with gradients) share :mod:`taemi.backbones.trainable`;
this module stays free of torch at import time, so the extraction pipeline can import it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from taemi.backbones.weights import ModelLocation

SAMPLE_RATE = 16_000  # Hz, every audio encoder and recogniser takes 16 kHz mono float32


class ModelLoadError(RuntimeError):
    """A pretrained model could not be loaded."""

    def __init__(
        self, model: str, looked_in: str, how_to_fix: str, cause: BaseException | None = None
    ):
        self.model, self.looked_in, self.how_to_fix = model, looked_in, how_to_fix
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(
            f"cannot load model {model!r} (looked in {looked_in}){reason}. {how_to_fix}"
        )


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

    def encode(
        self, texts: list[str], *, token_states: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Texts -> ((N, D_t) float32 sentence vectors, per text (T_i, D_t) states or None)."""
        ...


def provenance(encoder: Any) -> dict[str, Any]:
    """``{"backbone": name, "settings": {...}}`` of an encoder, as the feature store records it."""
    return {"backbone": encoder.name, "settings": json.loads(json.dumps(encoder.settings))}


def refuse_remote_code(loc: ModelLocation, trust_remote_code: bool) -> None:
    """ModelLoadError when ``loc``'s config.json has an ``auto_map`` (its architecture is
    code shipped with the model) and ``trust_remote_code`` is off: the author's code is
    never silently replaced by a built-in class, nor run without being asked for."""
    raw = loc.config_json()
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


# --------------------------------------------------------------------------------------
# Small checks shared by the families
# --------------------------------------------------------------------------------------


def check_device(device: str) -> None:
    """The offline models (CTranslate2, onnxruntime) take ``"cpu"`` or ``"cuda"``."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def as_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` | ``"float16"`` | ``"bfloat16"`` (or that torch dtype) -> torch dtype."""
    import torch

    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, torch.dtype):
        if dtype not in allowed.values():
            raise ValueError(f"dtype {dtype} not supported; use one of {sorted(allowed)}")
        return dtype
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(allowed)}")
    return allowed[dtype]


def as_torch_device(device: str | torch.device) -> torch.device:
    """``"cpu"`` or ``"cuda[:N]"`` (CUDA must be available) -> torch device."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size
