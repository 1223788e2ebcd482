"""The ABAW EMI (Hume-Vidmimic2) data layout as the organisers ship it (docs/method.md section 2).

A root holds::

    ROOT/
      train_split.csv, valid_split.csv   Filename,<six emotions>; Filename a 5-digit id
      test_split.csv                     optional; a Filename column (labels not needed)
      raw/{id}.mp4                       the videos (speech + face)
      audio/{id}.mp3                     optional; mono 16 kHz audio of each video
      face_images/{id}/{k}.jpg           optional; aligned face crops, k an unpadded integer

The test side has videos (and face images) but no labels. It may sit in the same root
(with or without a ``test_split.csv``) or in a root of its own (``raw/`` + optional
``face_images/``, no CSV): both open with :func:`open_abaw`.

Ids are strings exactly as written (``"00042"`` stays ``"00042"``; docs/method.md section 8). Media
files are found by their stem: ``raw/`` takes any extension of
:data:`MEDIA_EXTENSIONS` (``.mp4`` preferred when a stem has
several; the generated demo corpus writes audio-only clips as ``raw/{id}.m4a``),
``audio/`` likewise with ``.mp3`` preferred. Face frames are ordered numerically by
:func:`taemi.extract.media.read_face_images` (``10.jpg`` after ``9.jpg``).

:meth:`AbawLayout.sources` turns ids into :class:`taemi.extract.pipeline.Source` objects
for ``taemi.extract.pipeline.extract``; an id without any media becomes an input error
record (the shape ``extract(input_errors=...)`` takes), never an exception.

Importing this module is light: the extract pipeline (PyAV, OpenCV) is imported only by
:meth:`AbawLayout.sources`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from taemi.data.labels import read_ids
from taemi.store.clip import check_clip_id

if TYPE_CHECKING:
    from taemi.extract.pipeline import Source

__all__ = ["MEDIA_EXTENSIONS", "AbawLayout", "is_abaw_root", "open_abaw"]

log = logging.getLogger(__name__)

VIDEO_DIR = "raw"
AUDIO_DIR = "audio"
FACE_DIR = "face_images"
#: A split file is ``{name}_split.csv``; the name ("train", "valid", "test") keys ``splits``.
SPLIT_SUFFIX = "_split.csv"
ID_COLUMN = "Filename"

#: Extensions of the media files taken from a folder (here and by ``taemi extract --input DIR``).
MEDIA_EXTENSIONS = (
    ".mp4",
    ".mkv",
    ".webm",
    ".flv",
    ".avi",
    ".mov",
    ".mp3",
    ".wav",
    ".m4a",
    ".flac",
    ".ogg",
)
_MAX_LISTED = 5


def _error_record(clip_id: str | None, path: Path | None, reason: str) -> dict:
    """An input error, shaped like ``taemi.extract.pipeline._error_record`` (tests check)."""
    return {
        "clip_id": clip_id,
        "path": None if path is None else os.fsencode(path).decode("utf-8", "backslashreplace"),
        "stage": "input",
        "exception": None,
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _index_media(folder: Path, prefer: str) -> tuple[dict[str, Path], list[dict]]:
    """Media files directly in ``folder`` by stem (``prefer`` wins a shared stem), and
    input errors for files whose name is not a usable clip id. Hidden files are skipped."""
    index: dict[str, Path] = {}
    errors: list[dict] = []
    if not folder.is_dir():
        return index, errors
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in MEDIA_EXTENSIONS or not p.is_file():
            continue
        try:
            clip_id = check_clip_id(p.stem, source=str(p))
        except ValueError as e:
            errors.append(_error_record(None, p, str(e)))
            continue
        old = index.get(clip_id)
        if old is not None:
            keep = p if p.suffix.lower() == prefer and old.suffix.lower() != prefer else old
            log.warning(
                "%s: clip %s has %s and %s; using %s", folder, clip_id, old.name, p.name, keep.name
            )
            p = keep
        index[clip_id] = p
    return index, errors


@dataclass
class AbawLayout:
    """An opened ABAW EMI root (see the module docstring); make one with :func:`open_abaw`."""

    root: Path  # the folder holding raw/ (and the split CSVs)
    splits: dict[str, Path] = field(
        default_factory=dict
    )  # "train"/"valid"/"test" -> {name}_split.csv

    @property
    def video_dir(self) -> Path:
        return self.root / VIDEO_DIR

    @property
    def audio_dir(self) -> Path:
        return self.root / AUDIO_DIR

    @property
    def face_dir(self) -> Path:
        return self.root / FACE_DIR

    def _media(self) -> tuple[dict[str, Path], dict[str, Path], list[dict]]:
        videos, e1 = _index_media(self.video_dir, ".mp4")
        audios, e2 = _index_media(self.audio_dir, ".mp3")
        return videos, audios, e1 + e2

    def ids(self, split: str | None = None) -> list[str]:
        """Ids of ``split`` (from its CSV, file order), or, with ``None``, every clip with a
        file under ``raw/`` or ``audio/`` (sorted).

        ``"test"`` without a ``test_split.csv`` means every clip found under ``raw/`` and
        ``audio/`` that no other split lists (all of them in a separate test root).
        Raises ``ValueError`` for another split name without a CSV.
        """
        if split is None:
            videos, audios, _ = self._media()
            return sorted(set(videos) | set(audios))
        if split in self.splits:
            return read_ids(self.splits[split], ID_COLUMN, what="split file", allow_empty=False)
        if split == "test":
            listed = {
                i
                for name in self.splits
                for i in read_ids(
                    self.splits[name], ID_COLUMN, what="split file", allow_empty=False
                )
            }
            ids = [i for i in self.ids() if i not in listed]
            log.info(
                "%s: no test%s; test = the %d clips under %s/ and %s/ that %s",
                self.root,
                SPLIT_SUFFIX,
                len(ids),
                VIDEO_DIR,
                AUDIO_DIR,
                f"{', '.join(sorted(self.splits))} do not list"
                if self.splits
                else "the root holds",
            )
            return ids
        raise ValueError(
            f"{self.root}: no split {split!r} ({split}{SPLIT_SUFFIX} not found); "
            f"splits here: {sorted(self.splits) or 'none'}"
        )

    def sources(
        self,
        ids: str | Iterable[str] | None = None,
        *,
        use_face_images: bool = True,
        use_audio_files: bool = True,
    ) -> tuple[list[Source], list[dict]]:
        """One extraction :class:`~taemi.extract.pipeline.Source` per id, plus input errors.

        Args:
            ids: clip ids (in the order given), a split name (``"train"``, ``"valid"``,
                ``"test"``: see :meth:`ids`), or ``None`` for every clip found.
            use_face_images: take the clip's frames from ``face_images/{id}/`` when that
                folder exists (instead of decoding the video's frames).
            use_audio_files: take the clip's audio from ``audio/{id}.mp3`` when it exists
                (instead of the video's audio track); ``False`` ignores ``audio/``.

        A Source's ``media`` is ``raw/{id}.mp4``, or the audio file when the clip has no
        video. An id with no usable media, an invalid id, a repeated id and (with
        ``ids=None``) a media file whose name is not a valid id become input error records
        ``{clip_id, path, stage: "input", reason, time}``; they are not raised.
        """
        from taemi.extract.pipeline import Source

        videos, audios, errors = self._media()
        if not use_audio_files:
            audios = {}
        if ids is None:
            wanted = sorted(set(videos) | set(audios))
        else:
            wanted = self.ids(ids) if isinstance(ids, str) else list(ids)
            errors = []  # name problems of files that were not asked for are not this call's
        has_audio_field = "audio" in {f.name for f in dataclasses.fields(Source)}
        sources: list[Source] = []
        seen: set[str] = set()
        for raw_id in wanted:
            try:
                clip_id = check_clip_id(raw_id, source=f"ids for {self.root}")
            except ValueError as e:
                errors.append(_error_record(None, None, str(e)))
                continue
            if clip_id in seen:
                errors.append(_error_record(clip_id, None, f"clip id {clip_id!r} is listed twice"))
                continue
            seen.add(clip_id)
            video, audio = videos.get(clip_id), audios.get(clip_id)
            if video is None and audio is None:
                expected = self.video_dir / f"{clip_id}.mp4"
                errors.append(
                    _error_record(
                        clip_id, expected, self._no_media_reason(clip_id, videos, use_audio_files)
                    )
                )
                continue
            faces = self.face_dir / clip_id
            face_dir = faces if use_face_images and faces.is_dir() else None
            if video is None:
                sources.append(Source(clip_id, audio, face_dir))
            elif audio is None:
                sources.append(Source(clip_id, video, face_dir))
            elif has_audio_field:
                sources.append(Source(clip_id, video, face_dir, audio=audio))  # type: ignore[call-arg]
            elif face_dir is not None:
                # Until Source has an audio field: the frames come from face_dir, so the audio
                # file as ``media`` gives exactly the features asked for.
                sources.append(Source(clip_id, audio, face_dir))
            else:
                _warn_no_audio_field()
                sources.append(Source(clip_id, video, face_dir))
        return sources, errors

    def _no_media_reason(self, clip_id: str, videos: dict[str, Path], use_audio_files: bool) -> str:
        where = f"{VIDEO_DIR}/{clip_id}.mp4" + (
            f" or {AUDIO_DIR}/{clip_id}.mp3" if use_audio_files else ""
        )
        reason = f"no media for clip {clip_id!r}: neither {where} exists under {self.root}"
        if not use_audio_files and (self.audio_dir / f"{clip_id}.mp3").exists():
            reason += f" ({AUDIO_DIR}/{clip_id}.mp3 exists but audio files are not used)"
        if clip_id.isdigit():
            padded = [k for k in videos if k.isdigit() and k != clip_id and int(k) == int(clip_id)]
            if padded:
                reason += (
                    f"; {VIDEO_DIR}/ has {padded[0]!r}: was the id's zero padding lost "
                    "(e.g. the CSV saved by a spreadsheet)?"
                )
        return reason


_warned_no_audio_field = False


def _warn_no_audio_field() -> None:
    global _warned_no_audio_field
    if not _warned_no_audio_field:
        _warned_no_audio_field = True
        log.warning(
            "taemi.extract.pipeline.Source has no audio field: for clips without face images the "
            "audio comes from the video's track, not from %s/{id}.mp3",
            AUDIO_DIR,
        )


def is_abaw_root(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` looks like an ABAW EMI root: a ``raw/`` folder and at least one
    ``*_split.csv``, or ``raw/`` and ``face_images/`` (a test root)."""
    p = Path(path)
    if not (p / VIDEO_DIR).is_dir():
        return False
    return (p / FACE_DIR).is_dir() or any(q.is_file() for q in p.glob(f"*{SPLIT_SUFFIX}"))


def open_abaw(root: str | os.PathLike[str]) -> AbawLayout:
    """Open an ABAW EMI root (see the module docstring).

    Raises ``FileNotFoundError`` when ``root`` does not exist and ``ValueError`` when it
    is not a folder or has neither ``raw/`` (videos) nor ``audio/``; both name the path.
    """
    p = Path(root)
    if not p.exists():
        raise FileNotFoundError(f"ABAW root {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"ABAW root {p} is not a folder")
    if not (p / VIDEO_DIR).is_dir() and not (p / AUDIO_DIR).is_dir():
        found = sorted(q.name for q in p.iterdir())[:10]
        raise ValueError(
            f"{p} is not an ABAW EMI root: it has no {VIDEO_DIR}/ folder of videos "
            f"(nor {AUDIO_DIR}/); expected {VIDEO_DIR}/{{id}}.mp4, *{SPLIT_SUFFIX}, optional "
            f"{AUDIO_DIR}/ and {FACE_DIR}/ (found: {found})"
        )
    splits = {
        q.name[: -len(SPLIT_SUFFIX)]: q
        for q in sorted(p.glob(f"*{SPLIT_SUFFIX}"))
        if q.is_file() and len(q.name) > len(SPLIT_SUFFIX)
    }
    layout = AbawLayout(root=p, splits=splits)
    log.debug("ABAW root %s: splits %s", p, sorted(splits))
    return layout
