"""One clip's features as they flow between extraction, the store and batching."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taemi import MODALITIES


def check_clip_id(clip_id: object, *, source: str = "") -> str:
    """Return ``clip_id`` if it is a safe, non-empty string; raise ``ValueError`` otherwise.

    Clip ids end up in file names (transcripts, per-clip outputs), so an id that could
    leave its folder is refused: path separators, ``..``, a leading dot, NUL and other
    control characters. ``source`` (a file name, a row) is quoted in the message.
    """
    where = f" in {source}" if source else ""
    if not isinstance(clip_id, str):
        raise ValueError(f"clip id {clip_id!r}{where} is a {type(clip_id).__name__}, not a string")
    if clip_id == "" or clip_id.strip() != clip_id:
        raise ValueError(f"clip id {clip_id!r}{where} is empty or has surrounding whitespace")
    if "/" in clip_id or "\\" in clip_id:
        raise ValueError(f"clip id {clip_id!r}{where} contains a path separator")
    if clip_id.startswith(".") or ".." in clip_id:
        raise ValueError(f"clip id {clip_id!r}{where} starts with '.' or contains '..'")
    if any(ord(c) < 32 or ord(c) == 127 for c in clip_id):
        raise ValueError(f"clip id {clip_id!r}{where} contains a control character")
    return clip_id


@dataclass
class ClipFeatures:
    """Features of one clip.

    A modality that is ``None`` is missing (no audio track, no face, empty transcript,
    unreadable input). ``missing`` is derived from that, and a store reader returns
    ``None`` for a missing modality too. A present sequence has at least one row.
    """

    clip_id: str
    audio: np.ndarray | None  # (T_a, D_a)
    vision: np.ndarray | None  # (T_v, D_v)
    text: np.ndarray | None  # (D_t,)
    text_tokens: np.ndarray | None = None  # (T_t, D_t), optional token states

    @property
    def missing(self) -> tuple[bool, bool, bool]:
        """Missing flag per modality, in :data:`taemi.MODALITIES` order (audio, vision, text)."""
        return tuple(getattr(self, m) is None for m in MODALITIES)  # type: ignore[return-value]
