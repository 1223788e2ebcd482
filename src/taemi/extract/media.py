"""Decode clip media with FFmpeg (through PyAV): mono 16 kHz audio and RGB video frames.

docs/method.md section 2 (media as users receive it: ``raw/{id}.mp4``, ``audio/{id}.mp3``,
``face_images/{id}/{k}.jpg``; container fps metadata is unreliable; audio outliers up to
~1250 s), section 3 (the audio backbone sees the first 12 s of 16 kHz mono audio, zero-padded,
with an attention mask; vision sees at most 400 face frames, the release keeps the first 400)
and section 8 (sort face frames numerically; fail loudly).

Rules this module implements (each one is tested in ``tests/test_media.py``):

- Streams are picked by type, never by index (a CREMA-D FLV's first stream is a data
  stream). Audio: the first audio stream. Video: the first video stream that is not an
  attached picture (the cover art an MP3 may carry is not video).
- Audio is resampled by PyAV's ``AudioResampler`` (FFmpeg's swresample) to mono ``flt`` at
  ``sample_rate``; stereo and multichannel tracks are downmixed by FFmpeg's standard matrix.
  Decoding streams packet by packet and stops as soon as more than ``max_seconds`` of output
  exist, so a 20-minute file costs about what a 12 s one does; the kept samples are exactly
  the first ``round(max_seconds * sample_rate)`` output samples (never padded; see
  :meth:`Audio.padded`). When the file ends first, the resampler is flushed so its tail is
  kept too. A track whose sample rate or channel layout changes mid-stream (concatenated
  MP3s) is resampled piece by piece. Audio timestamps are not used: the samples are the
  decoded samples in order (a start offset or a gap in the timestamps is neither padded
  nor filled).
- Video frames are RGB ``uint8`` ``(H, W, 3)`` in presentation order. Their timestamps are
  ``frame.pts * time_base`` in seconds, never derived from the container's frame rate.
- A vision sampling rate (``vision_fps``, :func:`rate_representatives`) thins the frames a
  policy selects to at most that many per second of real timestamps, before any frame is
  converted or transformed (face-cropped); each kept frame records how many of the
  selected frames it stands for (:attr:`Video.repeats`).
- Damaged input: a packet the decoder rejects is skipped and counted, a demuxer error ends
  the stream there; what decoded is kept and one warning per file says what was lost. A
  stream that yields nothing at all is a :class:`MediaError`. A file that ends well before
  the duration its container declares (truncated, often without any decoder error) is kept
  with a warning. Missing, empty, directory, unreadable, unsupported or garbage files are a
  :class:`MediaError` whose message starts with the file name.
- A file without an audio (video) stream gives ``None`` from :func:`decode_audio`
  (:func:`decode_video`): that modality is missing, which is not an error.

File names may be ``str``, ``bytes`` or path-like, including names that are not valid UTF-8
(Linux): they are opened by their exact bytes and shown with ``\\xNN`` escapes in messages.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

try:
    import av
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taemi.extract.media needs PyAV (FFmpeg bindings): pip install 'av>=18.1'"
    ) from exc
from PIL import Image

log = logging.getLogger(__name__)

#: A file name as the functions here accept it.
PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
#: Applied to each selected RGB frame as it is decoded; ``None`` drops the frame.
FrameTransform = Callable[[np.ndarray], Optional[np.ndarray]]

#: Video frame selection policies of :func:`decode_video`.
POLICIES = ("first", "uniform")

#: File suffixes :func:`read_face_images` reads (lower case).
FACE_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

_FRAME_INDEX = re.compile(r"[0-9]+")


class MediaError(Exception):
    """A media file cannot be used (missing, empty, a directory, unreadable, unsupported,
    corrupt, or decodes to nothing). The message starts with the file's name."""


def display_path(path: PathArg) -> str:
    """``path`` as printable text: bytes that are not UTF-8 appear as ``\\xNN`` escapes.

    ``os.fsdecode`` alone would leave lone surrogates, which a UTF-8 log handler cannot
    write; this never does.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _printable(text: str) -> str:
    # Messages from FFmpeg/PIL may quote the file name with lone surrogates in it.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(path: PathArg, problem: str) -> MediaError:
    return MediaError(f"{display_path(path)}: {_printable(problem)}")


@dataclass
class Audio:
    """Decoded audio of one clip."""

    samples: np.ndarray  # (N,) float32 mono at sample_rate: the first max_seconds, not padded
    sample_rate: int  # samples per second of ``samples``
    duration: float | None  # whole track in seconds as the container declares it, or None
    truncated: bool  # True when the file was longer than max_seconds and was cut

    @property
    def seconds(self) -> float:
        """Length of ``samples`` in seconds."""
        return self.samples.shape[0] / self.sample_rate

    def padded(self, seconds: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
        """``(waveform, mask)``: ``samples`` zero-padded to ``round(seconds * sample_rate)``.

        waveform: (S,) float32; mask: (S,) int32, 1 exactly on the real samples. Raises
        ``ValueError`` if ``samples`` is longer than ``seconds`` (decode with a matching
        ``max_seconds``).
        """
        length = round(seconds * self.sample_rate)
        n = self.samples.shape[0]
        if n > length:
            raise ValueError(
                f"cannot pad {n} samples ({n / self.sample_rate:.3f} s) to {seconds} s "
                f"({length} samples): decode with max_seconds <= {seconds}"
            )
        wave = np.zeros(length, dtype=np.float32)  # (S,)
        wave[:n] = self.samples
        mask = np.zeros(length, dtype=np.int32)  # (S,)
        mask[:n] = 1
        return wave, mask


@dataclass
class Video:
    """Frames of one clip (decoded video, face crops or face images)."""

    frames: list[np.ndarray]  # n arrays (H, W, 3) uint8 RGB, in presentation order
    timestamps: np.ndarray  # (n,) float64: seconds from pts (face_images: the frame index k)
    total_frames_seen: int  # frames the policy chose from (see decode_video)
    policy: str  # "first" or "uniform"
    # (n,) int64: how many of the policy's frames each frame stands for, itself included
    # (decode_video's vision_fps); None -> all ones (every selected frame is its own)
    repeats: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.frames) != self.timestamps.shape[0]:
            raise ValueError(
                f"Video has {len(self.frames)} frames but {self.timestamps.shape[0]} timestamps"
            )
        if self.repeats is None:
            self.repeats = np.ones(len(self.frames), dtype=np.int64)  # (n,)
        self.repeats = np.asarray(self.repeats, dtype=np.int64)
        if self.repeats.shape != (len(self.frames),) or (self.repeats < 1).any():
            raise ValueError(
                f"Video has {len(self.frames)} frames but repeats {self.repeats.tolist()!r} "
                "(one count >= 1 per frame)"
            )

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class _Problems:
    """What went wrong while decoding one stream (reported once per file)."""

    skipped_packets: int = 0
    first_error: str | None = None
    demux_error: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str | None:
        parts = []
        if self.skipped_packets:
            parts.append(
                f"skipped {self.skipped_packets} undecodable packet(s) (first: {self.first_error})"
            )
        if self.demux_error:
            parts.append(f"reading stopped early: {self.demux_error}")
        return "; ".join(parts) or None


def _open(path: PathArg) -> av.container.InputContainer:
    """Open ``path`` for reading, or raise :class:`MediaError` saying why it cannot be."""
    name = os.fsdecode(path)  # PyAV encodes str names back with surrogateescape: exact bytes
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except PermissionError:
        raise _error(path, "permission denied") from None
    except OSError as exc:
        raise _error(path, f"cannot stat it: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _error(path, "is a directory, not a media file")
    if not stat.S_ISREG(st.st_mode):
        raise _error(path, "is not a regular file")
    if st.st_size == 0:
        raise _error(path, "is empty (0 bytes)")
    try:
        return av.open(name, mode="r")
    except PermissionError:  # av.error.PermissionError is also the builtin one
        raise _error(path, "permission denied") from None
    except av.error.FFmpegError as exc:
        raise _error(
            path,
            f"FFmpeg cannot read it as media ({exc.strerror}): not a media file, "
            "an unsupported format, or corrupt",
        ) from None


def _container_seconds(container: av.container.InputContainer) -> float | None:
    if container.duration is None or container.duration <= 0:
        return None
    return container.duration / av.time_base


def _stream_seconds(
    stream: av.stream.Stream, container: av.container.InputContainer
) -> float | None:
    """Duration of ``stream`` from its header, else the container's, else None."""
    if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return _container_seconds(container)


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    for stream in container.streams.video:
        if av.stream.Disposition.attached_pic not in stream.disposition:
            return stream
    return None


def probe(path: PathArg) -> dict[str, object]:
    """What ``path`` holds: ``{"audio": bool, "video": bool, "duration": float | None,
    "format": str}``: streams by type (cover art is not video), the duration in seconds as
    the container declares it, the format as FFmpeg's demuxer name (``"flv"``,
    ``"mov,mp4,m4a,3gp,3g2,mj2"``). Raises :class:`MediaError` if the file cannot be read."""
    with _open(path) as container:
        return {
            "audio": bool(container.streams.audio),
            "video": _video_stream(container) is not None,
            "duration": _container_seconds(container),
            "format": container.format.name,
        }


def _decoded_frames(
    container: av.container.InputContainer, stream: av.stream.Stream, problems: _Problems
) -> Iterator[av.frame.Frame]:
    """Frames of ``stream`` in decoder output order; damage is recorded in ``problems``."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                problems.skipped_packets += 1
                if problems.first_error is None:
                    problems.first_error = exc.strerror
                continue
            yield from frames
    except av.error.FFmpegError as exc:
        problems.demux_error = exc.strerror


class _Samples:
    """Concatenates resampled mono frames, keeping at most ``limit`` samples."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.chunks: list[np.ndarray] = []
        self.kept = 0
        self.cut = False  # more output existed than ``limit``

    def add(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            x = frame.to_ndarray().reshape(-1)  # (1, n) packed mono float -> (n,)
            if self.limit is not None and self.kept + x.shape[0] > self.limit:
                x = x[: self.limit - self.kept]
                self.cut = True
            if x.shape[0]:
                self.chunks.append(x.astype(np.float32, copy=True))
                self.kept += x.shape[0]

    def array(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self.chunks)  # (N,)


def decode_audio(
    path: PathArg, *, sample_rate: int = 16000, max_seconds: float | None = 12.0
) -> Audio | None:
    """The first audio stream of ``path`` as mono float32 at ``sample_rate``, cut to
    ``max_seconds`` (``None``: the whole track). ``None`` if the file has no audio stream.

    Raises :class:`MediaError` if the file cannot be read, or its audio stream decodes to no
    samples or to non-finite ones. A silent track is fine (real zeros).
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
    limit = None if max_seconds is None else round(max_seconds * sample_rate)
    with _open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        duration = _stream_seconds(stream, container)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        out = _Samples(limit)
        problems = _Problems()
        for frame in _decoded_frames(container, stream, problems):
            try:
                resampled = resampler.resample(frame)
            except ValueError:  # PyAV: this frame's rate/layout/format differs from the first
                log.debug(
                    "%s: audio changes to %d Hz %s mid-stream",
                    display_path(path),
                    frame.rate,
                    frame.layout.name,
                )
                out.add(resampler.resample(None))  # the old setup's tail, then a new one
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                resampled = resampler.resample(frame)
            out.add(resampled)
            if out.cut:
                break  # stop reading: nothing after max_seconds is ever demuxed
        if not out.cut:
            out.add(resampler.resample(None))  # flush the resampler's delayed tail
    samples = out.array()  # (N,) float32
    damage = problems.describe()
    if samples.shape[0] == 0:
        raise _error(
            path, "audio stream decodes to no samples" + (f" ({damage})" if damage else "")
        )
    if not np.isfinite(samples).all():
        raise _error(path, "audio stream decodes to non-finite samples (NaN or inf)")
    if damage:
        log.warning(
            "%s: audio: %s; kept %.2f s", display_path(path), damage, samples.shape[0] / sample_rate
        )
    got = samples.shape[0] / sample_rate
    if not out.cut and duration is not None and duration - got > max(0.5, 0.1 * duration):
        log.warning(
            "%s: audio ends after %.2f s but the container declares %.2f s: "
            "the file may be truncated",
            display_path(path),
            got,
            duration,
        )
    return Audio(samples=samples, sample_rate=sample_rate, duration=duration, truncated=out.cut)


def uniform_indices(times: np.ndarray, count: int) -> np.ndarray:
    """Indices of the frames (of sorted, distinct ``times``) nearest to ``count`` targets
    spread evenly from the first to the last time, both included (ties go to the earlier
    frame). All indices if there are at most ``count`` frames; fewer than ``count`` only
    when irregular timestamps make two targets share their nearest frame.

    times: (n,) increasing; returns (k,) int64 increasing, k <= count.
    """
    n = times.shape[0]
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if n <= count:
        return np.arange(n, dtype=np.int64)
    targets = np.linspace(float(times[0]), float(times[-1]), count)  # (count,)
    right = np.clip(np.searchsorted(times, targets, side="left"), 1, n - 1)  # (count,)
    left = right - 1
    take_right = (times[right] - targets) < (targets - times[left])  # ties: the earlier frame
    return np.unique(np.where(take_right, right, left).astype(np.int64))


#: Tolerance of the sampling-rate slots, in slots: a timestamp a rounding error short of a
#: slot boundary (0.1 s as 0.09999999) still opens the next slot.
_SLOT_TOLERANCE = 1e-6


def _slot(t: float, t0: float, fps: float) -> int:
    return math.floor((t - t0) * fps + _SLOT_TOLERANCE)


def rate_representatives(times: np.ndarray, fps: float) -> np.ndarray:
    """For every frame (of timestamps ``times``, in decoding order), the index of the frame
    whose feature stands for it when vision runs at ``fps`` frames per second.

    The rule (:func:`decode_video` applies it while decoding): time from the first frame is
    cut into slots of ``1 / fps`` seconds, ``[t0 + k / fps, t0 + (k + 1) / fps)``; a frame
    whose slot differs from the previous frame's starts a new representative, the others
    are represented by it. With increasing timestamps that is the first frame of every
    slot: one frame per slot, so at most ``fps`` frames (``ceil(fps)`` for a fraction) in
    every second counted from the first frame, whatever the container's frame rate; frames
    already further apart than ``1 / fps`` are all kept.

    times: (n,) float seconds; returns (n,) int64, non-decreasing, ``rep[i] <= i``.
    """
    if isinstance(fps, bool) or not (
        isinstance(fps, (int, float, np.integer, np.floating)) and math.isfinite(fps) and fps > 0
    ):
        raise ValueError(f"vision_fps must be a positive number, got {fps!r}")
    n = times.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    slots = np.array([_slot(float(t), float(times[0]), fps) for t in times])  # (n,)
    new = np.ones(n, dtype=bool)
    new[1:] = slots[1:] != slots[:-1]
    return np.maximum.accumulate(np.where(new, np.arange(n), 0)).astype(np.int64)  # (n,)


class _Kept:
    """The frames a policy selects, thinned to ``fps`` (:func:`rate_representatives`) and
    transformed: only a representative is converted to RGB and transformed; the frames it
    stands for add to its repeat count, or are dropped with it when the transform drops it
    (no face)."""

    def __init__(self, transform: FrameTransform | None, fps: float | None) -> None:
        self.transform, self.fps = transform, fps
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.repeats: list[int] = []
        self._t0: float | None = None
        self._slot: int | None = None
        self._holding = False  # the current representative was kept

    def add(self, frame: av.VideoFrame, t: float) -> None:
        if self.fps is not None:
            if self._t0 is None:
                self._t0 = t
            slot = _slot(t, self._t0, self.fps)
            if slot == self._slot:  # stands in the current representative's slot
                if self._holding:
                    self.repeats[-1] += 1
                return
            self._slot = slot
        image = _apply(self.transform, frame.to_ndarray(format="rgb24"))  # (H, W, 3) uint8
        self._holding = image is not None
        if image is not None:
            self.frames.append(image)
            self.times.append(t)
            self.repeats.append(1)


def _frame_seconds(path: PathArg, frame: av.VideoFrame, time_base: Fraction, index: int) -> float:
    if frame.pts is None:
        raise _error(path, f"video frame {index} has no timestamp (pts)")
    return float(frame.pts * time_base)


def _decode_first(
    path: PathArg,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    max_frames: int,
    max_seconds: float | None,
    kept: _Kept,
) -> tuple[int, _Problems]:
    problems = _Problems()
    end: float | None = None
    seen = 0
    for frame in _decoded_frames(container, stream, problems):
        t = _frame_seconds(path, frame, stream.time_base, seen)
        if max_seconds is not None:
            if end is None:
                end = t + max_seconds
            if t >= end:
                break
        seen += 1
        kept.add(frame, t)
        if seen >= max_frames:
            break
    return seen, problems


def _packet_pts(
    path: PathArg, stream: av.video.stream.VideoStream, max_seconds: float | None
) -> tuple[np.ndarray, _Problems]:
    """Pass 1 of the uniform policy: distinct video packet pts (sorted), demuxed only."""
    problems = _Problems()
    pts: list[int] = []
    with _open(path) as container:
        video = container.streams[stream.index]  # same file, same stream order
        try:
            for packet in container.demux(video):
                if packet.size == 0:  # PyAV's end-of-stream flush packet
                    continue
                if packet.pts is None:
                    raise _error(
                        path,
                        "a video packet has no timestamp: policy 'uniform' plans by packet "
                        "timestamps; use policy 'first' for this file",
                    )
                pts.append(packet.pts)
        except av.error.FFmpegError as exc:
            problems.demux_error = exc.strerror
    ticks = np.unique(np.asarray(pts, dtype=np.int64))  # (n,) sorted presentation times
    if max_seconds is not None and ticks.shape[0]:
        seconds = (ticks - ticks[0]) * float(stream.time_base)  # (n,)
        ticks = ticks[seconds < max_seconds]
    return ticks, problems


def _decode_uniform(
    path: PathArg,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    max_frames: int,
    max_seconds: float | None,
    kept: _Kept,
) -> tuple[int, _Problems]:
    ticks, problems = _packet_pts(path, stream, max_seconds)  # (n,)
    if ticks.shape[0] == 0:
        return 0, problems
    wanted = {int(p) for p in ticks[uniform_indices(ticks, max_frames)]}
    last = max(wanted)
    found: set[int] = set()
    for decoded, frame in enumerate(_decoded_frames(container, stream, problems)):
        t = _frame_seconds(path, frame, stream.time_base, decoded)
        if frame.pts in wanted and frame.pts not in found:
            found.add(frame.pts)
            kept.add(frame, t)
        if frame.pts >= last:
            break
    if len(found) < len(wanted):
        problems.notes.append(
            f"{len(wanted) - len(found)} of {len(wanted)} planned frames did not decode "
            "with the timestamp of their packet"
        )
    return int(ticks.shape[0]) if found else 0, problems  # 0: nothing decoded


def _apply(transform: FrameTransform | None, image: np.ndarray) -> np.ndarray | None:
    return image if transform is None else transform(image)


def decode_video(
    path: PathArg,
    *,
    max_frames: int = 400,
    policy: str = "first",
    max_seconds: float | None = None,
    transform: FrameTransform | None = None,
    vision_fps: float | None = None,
) -> Video | None:
    """Up to ``max_frames`` RGB frames of the first video stream of ``path``; ``None`` if
    the file has no video stream (an attached cover picture does not count).

    policy ``"first"`` (the release's choice): the first ``max_frames`` decoded frames;
    ``total_frames_seen`` is the number decoded.

    policy ``"uniform"``: ``max_frames`` frames spread evenly over the clip's time span, by
    exactly this rule: pass 1 demuxes the video packets without decoding and collects their
    distinct timestamps (n frames; a packet without a timestamp is a ``MediaError``); pass 2
    decodes once more and keeps the frames :func:`uniform_indices` picks (nearest to evenly
    spaced target times, first and last frame included). Memory holds at most
    ``max_frames`` frames; ``total_frames_seen`` is n. It does not depend on the
    container's declared duration or frame rate.

    ``max_seconds``: only frames less than that many seconds after the first frame are
    considered (decoding stops there). Raises :class:`MediaError` if the file cannot be
    read or its video stream decodes to no frames.

    ``transform`` (e.g. :meth:`taemi.extract.face.FaceCropper.crop_frame`) is applied to
    each selected frame as soon as it is decoded, so memory holds transformed frames
    only; a frame it maps to ``None`` (no face) is dropped. The frames are selected
    before the transform: ``max_frames`` counts decoded frames, not kept ones. If every
    frame is dropped, the result has no frames (not an error).

    ``vision_fps`` (None: every selected frame, the exact path): the frames the policy
    selects are thinned to at most that many per second of their real timestamps, by the
    rule of :func:`rate_representatives` (slots of ``1 / vision_fps`` s from the first
    selected frame; the first frame of each slot is kept). Only kept frames are converted
    and transformed, so the skipped ones cost no face detection (they are still decoded:
    a video codec cannot skip frames). ``repeats[i]`` counts the selected frames frame
    ``i`` stands for (itself and the skipped frames of its slot); when the transform drops
    a kept frame, the frames it stands for go with it. ``max_frames``, the policy and
    ``total_frames_seen`` are the same as without ``vision_fps``, and ``repeats.sum()``
    is the number of frames the exact path keeps whenever the transform keeps or drops
    whole slots alike.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown video policy {policy!r}; expected one of {POLICIES}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
    if vision_fps is not None:
        rate_representatives(np.zeros(0), vision_fps)  # validates it
    kept = _Kept(transform, vision_fps)
    with _open(path) as container:
        stream = _video_stream(container)
        if stream is None:
            return None
        decode = _decode_first if policy == "first" else _decode_uniform
        seen, problems = decode(path, container, stream, max_frames, max_seconds, kept)
    damage = "; ".join(filter(None, [problems.describe(), *problems.notes]))
    if not seen:
        raise _error(path, "video stream decodes to no frames" + (f" ({damage})" if damage else ""))
    if damage:
        log.warning("%s: video: %s; kept %d frames", display_path(path), damage, len(kept.frames))
    timestamps = np.asarray(kept.times, dtype=np.float64)  # (n,)
    if timestamps.shape[0] > 1 and not (np.diff(timestamps) > 0).all():
        log.warning("%s: video timestamps are not strictly increasing", display_path(path))
    return Video(
        frames=kept.frames,
        timestamps=timestamps,
        total_frames_seen=seen,
        policy=policy,
        repeats=np.asarray(kept.repeats, dtype=np.int64),  # (n,)
    )


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    except (OSError, Image.DecompressionBombError) as exc:
        raise _error(path, f"unreadable image: {type(exc).__name__}: {exc}") from None


def read_face_images(folder: PathArg, *, max_frames: int = 400) -> Video | None:
    """The face crops ``folder/{k}.jpg`` of one clip (ABAW ``face_images/{id}/``) as a Video.

    ``k`` is an integer frame index; files are sorted numerically (``10`` after ``9``) and
    the first ``max_frames`` are read as RGB. ``timestamps`` holds ``k`` (a frame index,
    not seconds). ``None`` when the folder is missing or holds no images (vision missing).
    Raises :class:`MediaError` for a path that is not a folder, an image whose name is not
    an integer, two files with the same index (``1.jpg``, ``01.jpg``) or an unreadable
    image. Non-image files are ignored with a warning.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    root = Path(os.fsdecode(folder))
    if not root.exists():
        log.debug("%s: no face image folder", display_path(root))
        return None
    if not root.is_dir():
        raise _error(root, "is not a folder (expected face_images/{id}/ with {k}.jpg files)")
    indexed: dict[int, Path] = {}
    ignored = 0
    for entry in root.iterdir():
        if entry.suffix.lower() not in FACE_IMAGE_SUFFIXES or not entry.is_file():
            ignored += 1
            continue
        if not _FRAME_INDEX.fullmatch(entry.stem):
            raise _error(entry, "face image name is not an integer frame index ({k}.jpg)")
        k = int(entry.stem)
        if k in indexed:
            raise _error(entry, f"frame index {k} appears twice (also {indexed[k].name})")
        indexed[k] = entry
    if ignored:
        log.warning("%s: ignored %d entries that are not face images", display_path(root), ignored)
    if not indexed:
        log.debug("%s: face image folder is empty", display_path(root))
        return None
    order = sorted(indexed)[:max_frames]
    frames = [_load_rgb(indexed[k]) for k in order]
    return Video(
        frames=frames,
        timestamps=np.asarray(order, dtype=np.float64),  # (n,) frame indices k
        total_frames_seen=len(indexed),
        policy="first",
    )
