"""Media files -> feature store: decoding in parallel with batched model inference.

docs/method.md section 3 (features per clip) and section 8 (traps). For every input clip:

1. decode (worker threads, ahead of the models): the first ``max_audio_seconds`` of
   16 kHz mono audio, and up to ``max_frames`` video frames (policy ``first`` or
   ``uniform``), thinned to at most ``vision_fps`` per second when set, face-cropped as
   they are decoded when a face cropper is configured;
2. recognise speech (the transcript is saved as ``STORE/transcripts/{id}.txt``);
3. encode, batched across clips: audio frames, one vector per face crop, the transcript;
4. write the clip to the store (atomic, resumable; see :mod:`taemi.store`).

A clip without an audio track, without a video track, without any detected face, or
with an empty transcript gets that modality's missing flag. A file with no audio and no
video stream at all (e.g. cut short after its container header) is not a clip: it fails
at ``decode``. A clip that cannot be processed (unreadable, corrupt, an unusable file
name, a folder, FIFO or dangling link named like media, or any exception of any library
while decoding, recognising, encoding or validating it) is recorded in
``STORE/extract_errors.jsonl`` with its ``stage`` (input, decode, asr, encode, write),
the ``exception`` type and the reason, and the run goes on; ``KeyboardInterrupt`` and
``SystemExit`` stop it, and so does a failure of the store itself (a commit that cannot
be written, e.g. a full disk: it would fail every clip), as a StoreError. The run ends
with ``STORE/extract_summary.json``: done, skipped (already in the store), failed,
missing counts, and seconds per stage. Nothing is written into a store the writer
refuses to open (other dims or settings, locked, not a store).

Durability: finished clips are committed every ``ExtractOptions.commit_clips`` clips or
``commit_seconds`` seconds, whichever comes first (:class:`taemi.store.StoreWriter`),
so a killed run (SIGKILL, a time limit, a lost node) loses at most that much work; the
rerun skips the committed clips. The small shards this makes are compacted when the run
ends normally (or by the next run). Under :func:`taemi.signals.sigterm_raises` (``taemi extract``,
``taemi predict``) SIGTERM stops a run like Ctrl-C: the finished clips are committed and
the summary is written.

Face detection runs in the decoding threads; each thread has its own detector (see
:mod:`taemi.extract.face`), so the features do not depend on ``workers``.

With ``ExtractOptions.waveforms`` (``taemi extract --waveforms``) the decoded audio of every
clip that has audio is also kept in the store's waveform cache (``STORE/waveforms/``, see
:mod:`taemi.store.waveforms`) for end-to-end fine-tuning. A clip already in the store whose
waveform is not cached yet has only its audio decoded and cached (no model runs, the store
is not touched). A waveform that cannot be cached is reported in the error file, stage
``waveform``, and counted in ``waveforms_failed``, not in ``failed`` (its features are fine).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from taemi.backbones.base import (
    SAMPLE_RATE,
    AudioEncoder,
    ImageEncoder,
    SpeechRecognizer,
    TextEncoder,
)
from taemi.extract.abaw import MEDIA_EXTENSIONS
from taemi.extract.face import FaceCropper
from taemi.extract.media import (
    MediaError,
    decode_audio,
    decode_video,
    display_path,
    read_face_images,
)
from taemi.store import (
    ERRORS_FILE,
    SUMMARY_FILE,
    TRANSCRIPTS,
    FeatureStore,
    StoreError,
    StoreWriter,
)
from taemi.store.clip import ClipFeatures, check_clip_id
from taemi.store.waveforms import WaveformCache

log = logging.getLogger(__name__)

STAGES = ("decode", "asr", "audio", "vision", "text", "write")
#: Clips per shard of the stores extraction writes (the small shards of frequent commits
#: are compacted up to this size).
SHARD_SIZE = 256


#: The shortest Whisper window (``--whisper-window``) that ``share_whisper`` decodes from: on
#: the CREMA-D sample, 10 s kept the word errors of the 30 s window (19 vs 22) while 5 s
#: made the decoder repeat itself (587; ``benchmarks/whisper_share.py --windows 5 10``).
SHARED_WINDOW_MIN_S = 10.0


@dataclass
class ExtractOptions:
    """How media become features (recorded in the store's provenance)."""

    max_audio_seconds: float = 12.0  # audio kept per clip (docs/method.md section 3: first 12 s)
    max_frames: int = 400  # video frames considered per clip
    frame_policy: str = "first"  # first (the release) | uniform (spread over the clip)
    # at most this many vision features per second of video, each repeated over the frames
    # it stands for (see _decode_into); None: every frame (the exact path); in the provenance when set
    vision_fps: float | None = None
    # transcripts decoded from the audio features' Whisper pass (offline profile: one encoder
    # pass per clip instead of two; see taemi.backbones.whisper); in the provenance when set
    share_whisper: bool = False
    batch_size: int = 8  # clips per model batch
    workers: int = 2  # decoding threads running ahead of the models
    text_tokens: bool = False  # also store the text encoder's token states
    force: bool = False  # recompute clips already in the store (replaces them)
    waveforms: bool = False  # also cache the decoded audio in STORE/waveforms/ (fine-tuning); not in the provenance
    commit_clips: int = (
        32  # commit finished clips when this many are pending; not in the provenance
    )
    commit_seconds: float = (
        10.0  # ... or when this many seconds passed since the last commit; not in the provenance
    )

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ValueError naming every impossible value (and its ``taemi extract`` flag); run at
        construction and again by :func:`extract` (fields may change in between)."""
        problems = []

        def whole(name: str, flag: str, most: int | None = None) -> None:
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v < 1
                or (most is not None and v > most)
            ):
                within = ">= 1" if most is None else f"in [1, {most}]"
                problems.append(f"{name} must be an integer {within}, got {v!r} ({flag})")

        def positive(name: str, flag: str) -> None:
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not (math.isfinite(v) and v > 0)
            ):
                problems.append(f"{name} must be a positive number, got {v!r} ({flag})")

        positive("max_audio_seconds", "--max-audio-seconds")
        whole("max_frames", "--max-frames")
        whole("batch_size", "--batch-size")
        whole("workers", "--workers")
        whole("commit_clips", "--commit-clips", SHARD_SIZE)
        positive("commit_seconds", "--commit-seconds")
        if self.vision_fps is not None:
            positive("vision_fps", "--vision-fps")
        if not isinstance(self.share_whisper, bool):
            problems.append(f"share_whisper must be true or false, got {self.share_whisper!r}")
        if self.frame_policy not in ("first", "uniform"):
            problems.append(
                f"frame_policy={self.frame_policy!r}: expected 'first' or 'uniform' (--frame-policy)"
            )
        if problems:
            raise ValueError("invalid extraction options: " + "; ".join(problems))


@dataclass
class Encoders:
    """One model per role; ``face`` None means frames are used uncropped."""

    asr: SpeechRecognizer
    audio: AudioEncoder
    image: ImageEncoder
    text: TextEncoder
    face: FaceCropper | None
    profile: str = "custom"

    def check_sharing(self, opts: ExtractOptions) -> None:
        """``share_whisper`` needs one Whisper model in both roles (the offline profile)."""
        if not opts.share_whisper:
            return
        from taemi.backbones.whisper import WhisperEncoder, WhisperRecognizer

        asr, audio = self.asr, self.audio
        if not (
            isinstance(asr, WhisperRecognizer)
            and isinstance(audio, WhisperEncoder)
            and asr.whisper is audio.whisper
        ):
            raise ValueError(
                f"share_whisper (--share-whisper) needs one Whisper model that both transcribes "
                f"and encodes the audio (the offline profile); here the transcripts come from "
                f"{asr.name} ({type(asr).__name__}) and the audio features from {audio.name} "
                f"({type(audio).__name__})"
            )
        if audio.window_s < SHARED_WINDOW_MIN_S:
            raise ValueError(
                f"share_whisper (--share-whisper) decodes the transcript from the audio "
                f"features' pass, and with a Whisper window of {audio.window_s:g} s "
                f"(--whisper-window) the decoder has been seen repeating itself; use a window "
                f"of at least {SHARED_WINDOW_MIN_S:g} s with it"
            )

    def provenance(self, opts: ExtractOptions) -> dict[str, dict]:
        """What produced each modality, for the store manifest."""
        common = {"profile": self.profile}
        return {
            "audio": {
                "backbone": self.audio.name,
                "settings": {
                    **common,
                    **self.audio.settings,
                    "max_seconds": opts.max_audio_seconds,
                    "sample_rate": SAMPLE_RATE,
                },
            },
            "vision": {
                "backbone": self.image.name,
                "settings": {
                    **common,
                    **self.image.settings,
                    "max_frames": opts.max_frames,
                    "frame_policy": opts.frame_policy,
                    "face": None if self.face is None else self.face.settings,
                    # only when set: stores and runs of the exact path keep their provenance
                    **({} if opts.vision_fps is None else {"vision_fps": float(opts.vision_fps)}),
                },
            },
            "text": {
                "backbone": self.text.name,
                "settings": {
                    **common,
                    **self.text.settings,
                    "asr": self.asr.name,
                    "asr_settings": self.asr.settings,
                    "token_states": opts.text_tokens,
                    # only when set: stores and runs of the exact path keep their provenance
                    **({"share_whisper": True} if opts.share_whisper else {}),
                },
            },
        }


@dataclass
class Source:
    """One clip to extract: its id and where its media are."""

    clip_id: str
    media: Path  # a video or audio file
    face_dir: Path | None = (
        None  # pre-cropped face images (ABAW face_images/{id}/); used instead of video frames
    )
    audio: Path | None = (
        None  # a separate audio file (ABAW audio/{id}.mp3); used instead of the media's track
    )


@dataclass
class Decoded:
    source: Source
    waveform: np.ndarray | None = None  # (S,) float32 16 kHz
    faces: list[np.ndarray] | None = None  # RGB crops; None: no video / no face
    repeats: np.ndarray | None = None  # (len(faces),) int64 frames per crop (vision_fps)
    # (T_v,) float64: per stored vision row, the timestamp (s) of the frame its feature came
    # from (video pts; ABAW face images: the frame index k); None without vision
    vision_times: np.ndarray | None = None
    error: str | None = None
    exception: str | None = None  # the error's exception type
    media_seconds: float = 0.0
    seconds: float = 0.0


@dataclass
class ExtractSummary:
    store: str
    total: int = 0  # inputs considered: sources plus files rejected by find_sources
    done: int = 0
    skipped: int = 0
    failed: int = 0
    missing: dict[str, int] = field(default_factory=lambda: {"audio": 0, "vision": 0, "text": 0})
    media_seconds: float = 0.0
    wall_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    errors_file: str | None = None
    started: str = field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S")
    )  # marks this run's error lines
    interrupted: bool = False  # the run stopped early (exception or Ctrl-C)
    waveforms: int = 0  # --waveforms: waveform files written in this run (all of them)
    waveforms_added: int = (
        0  # ... of which for clips already in the store (only their audio decoded)
    )
    waveforms_failed: int = 0  # --waveforms: waveforms that could not be cached (in the error file)

    @property
    def ok(self) -> bool:
        """False only when clips (or waveforms) were to be processed and none could be."""
        nothing_extracted = self.done == 0 and self.skipped == 0 and self.failed > 0
        return not (nothing_extracted or (self.waveforms == 0 and self.waveforms_failed > 0))


@dataclass
class ClipMedia:
    """What the decoding of one extracted clip knew that the store does not keep
    (:func:`extract`'s ``clip_media``; ``taemi serve`` places attention weights in time)."""

    media_seconds: float  # the media its features cover
    vision_times: np.ndarray | None  # (T_v,) seconds per stored vision row (Decoded.vision_times)


# --------------------------------------------------------------------------- inputs


def find_sources(inputs: Iterable[str | os.PathLike]) -> tuple[list[Source], list[dict]]:
    """Sources from folders (their media files, recursively), list files (one path per
    line) and single media files. Returns (sources sorted by id, input errors).

    In a folder, every entry with a media extension counts: one that is not a regular
    file (a dangling symbolic link, a folder, a FIFO, socket or device) is an input error,
    found with ``stat`` alone (a FIFO is never opened: reading one would block)."""
    paths: list[Path] = []
    errors: list[dict] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in MEDIA_EXTENSIONS)
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            base = p.parent
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    paths.append(q if q.is_absolute() else base / q)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"input {p} is neither a media file, a list file nor a folder")
    sources: dict[str, Source] = {}
    for path in paths:
        stem = path.stem
        try:
            stem.encode("utf-8")
        except UnicodeEncodeError:
            errors.append(
                _error_record(
                    None, path, "input", "the file name is not valid UTF-8; rename the file"
                )
            )
            continue
        try:
            clip_id = check_clip_id(stem, source=display_path(path))
        except ValueError as e:
            errors.append(_error_record(None, path, "input", str(e)))
            continue
        if clip_id in sources:
            errors.append(
                _error_record(
                    clip_id,
                    path,
                    "input",
                    f"clip id {clip_id!r} also comes from {sources[clip_id].media}; ids must be unique",
                )
            )
            continue
        problem = _not_a_media_file(path)
        if problem is not None:
            errors.append(_error_record(clip_id, path, "input", problem))
            continue
        sources[clip_id] = Source(clip_id, path)
    return [sources[k] for k in sorted(sources)], errors


def _not_a_media_file(path: Path) -> str | None:
    """Why ``path`` cannot be a media file (None if it is a regular file, or a link to one);
    ``stat`` only, nothing is opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"dangling symbolic link (to {display_path(os.readlink(path))})"
        return "file does not exist"
    except OSError as e:
        return f"cannot stat it: {e.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a media file (its name has a media extension)"
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "socket"
            if stat.S_ISSOCK(st.st_mode)
            else "device"
        )
        return f"is a {kind}, not a regular file (not opened)"
    return None


def _type_name(exc: BaseException) -> str:
    """``ValueError`` for builtins, ``module.Name`` otherwise (``cv2.error``)."""
    t = type(exc)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _error_record(
    clip_id: str | None, path: Path | None, stage: str, reason: str, exception: str | None = None
) -> dict:
    return {
        "clip_id": clip_id,
        "path": None if path is None else display_path(path),
        "stage": stage,
        "exception": exception,
        "reason": reason,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# --------------------------------------------------------------------------- decoding


def decode_source(src: Source, opts: ExtractOptions, face: FaceCropper | None) -> Decoded:
    """Decode one clip's audio and face frames. Every exception (any library's) is
    returned in ``error``/``exception``, not raised; a file with neither an audio nor a
    video stream is an error. KeyboardInterrupt and SystemExit propagate."""
    t0 = time.perf_counter()
    out = Decoded(src)
    try:
        _decode_into(out, src, opts, face)
    except MediaError as e:
        out.error, out.exception = str(e), _type_name(e)
    except Exception as e:  # noqa: BLE001 - any library: this file fails, the run goes on
        out.error, out.exception = f"{display_path(src.media)}: {_type_name(e)}: {e}", _type_name(e)
    if out.error is not None:
        out.waveform = out.faces = out.repeats = out.vision_times = None
    out.seconds = time.perf_counter() - t0
    return out


def _decode_into(out: Decoded, src: Source, opts: ExtractOptions, face: FaceCropper | None) -> None:
    """Fill ``out`` with the decoded audio and face frames of ``src``; raises on any problem."""
    audio = decode_audio(
        src.audio or src.media, sample_rate=SAMPLE_RATE, max_seconds=opts.max_audio_seconds
    )
    if audio is not None and audio.samples.shape[0] > 0:
        out.waveform = audio.samples  # (S,) float32
        out.media_seconds = audio.seconds
    if src.face_dir is not None:  # aligned face crops already (ABAW face_images): used as they are
        if opts.vision_fps is not None:
            raise ValueError(
                f"vision_fps={opts.vision_fps} (--vision-fps) needs frame timestamps in seconds, "
                f"but {display_path(src.face_dir)} holds face images numbered by frame index: "
                "decode the video (--no-face-images) or extract every frame"
            )
        video = read_face_images(src.face_dir, max_frames=opts.max_frames)
    else:
        # a FaceCropper crops through a per-video FaceTrack (its detect_every state); a plain
        # per-frame cropper (anything with crop_frame, e.g. a test stand-in) frame by frame
        track = face.for_video() if hasattr(face, "for_video") else None
        per_frame = None if face is None else face.crop_frame
        transform = per_frame if track is None else track
        # vision_fps: thinned before the face crop, so a skipped frame costs no detection and no
        # encoding. Each crop's feature is repeated over the frames it stands for (its
        # video.repeats), so the stored sequence keeps the exact path's length and row <-> frame
        # alignment: the fusion model has no positions, its mean and attention pooling weigh
        # rows, and repetition gives each feature the weight of the time it covers, as the
        # exact path's rows do (one row per sampled frame would weigh a partial last slot, an
        # irregular frame rate or a slot lost to detection like a full one).
        video = decode_video(
            src.media,
            max_frames=opts.max_frames,
            policy=opts.frame_policy,
            transform=transform,
            vision_fps=opts.vision_fps,
        )
        if track is not None:
            video = track.finish(video)  # drops the frames found to have no face
    out.faces = video.frames if video is not None and video.frames else None
    if out.faces is not None and opts.vision_fps is not None:
        out.repeats = video.repeats  # (len(faces),) int64
    if out.faces is not None:  # one time per stored row, as _encode_batch repeats the features
        times = np.asarray(video.timestamps, dtype=np.float64)  # (len(faces),)
        out.vision_times = times if out.repeats is None else np.repeat(times, out.repeats)
    if video is not None and len(video.timestamps) > 1:
        out.media_seconds = max(
            out.media_seconds, float(video.timestamps[-1] - video.timestamps[0])
        )
    if audio is None and video is None:
        files = [src.media] if src.audio is None else [src.media, src.audio]
        raise MediaError(
            f"{' and '.join(map(display_path, files))}: no audio or video stream to decode "
            "(FFmpeg finds none, e.g. in a file cut short after its container header); "
            "nothing to extract"
        )


def decode_waveform(src: Source, opts: ExtractOptions, face: FaceCropper | None = None) -> Decoded:
    """Decode only one clip's audio, exactly as :func:`decode_source` does (``faces`` stays None)."""
    t0 = time.perf_counter()
    out = Decoded(src)
    try:
        audio = decode_audio(
            src.audio or src.media, sample_rate=SAMPLE_RATE, max_seconds=opts.max_audio_seconds
        )
        if audio is not None and audio.samples.shape[0] > 0:
            out.waveform = audio.samples  # (S,) float32
            out.media_seconds = audio.seconds
    except MediaError as e:
        out.error, out.exception = str(e), _type_name(e)
    except Exception as e:  # noqa: BLE001 - any library: this waveform fails, the run goes on
        out.error, out.exception = (
            f"{display_path(src.audio or src.media)}: {_type_name(e)}: {e}",
            _type_name(e),
        )
    out.seconds = time.perf_counter() - t0
    return out


def _decoded_in_order(
    sources: list[Source],
    opts: ExtractOptions,
    face: FaceCropper | None,
    decode: Callable[[Source, ExtractOptions, FaceCropper | None], Decoded] | None = None,
) -> Iterator[Decoded]:
    """Decode with ``opts.workers`` threads, at most a few batches ahead (bounded memory);
    ``decode`` defaults to :func:`decode_source`."""
    decode = decode or decode_source
    ahead = max(2, opts.workers) * opts.batch_size
    pool = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="taemi-decode")
    try:
        pending: list[Future] = []
        it = iter(sources)
        for src in it:
            pending.append(pool.submit(decode, src, opts, face))
            if len(pending) >= ahead:
                break
        while pending:
            fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(decode, nxt, opts, face))
            yield fut.result()
    finally:  # also on Ctrl-C/SIGTERM: decodes not started yet are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(items: Iterator[Decoded], size: int) -> Iterator[list[Decoded]]:
    batch: list[Decoded] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- encoding


class _Timer:
    def __init__(self, summary: ExtractSummary):
        self.summary = summary

    def __call__(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.summary.stage_seconds[stage] += time.perf_counter() - self.t0

        return _Ctx()


class _StageFailed(Exception):
    """An exception of any type raised by one stage of :func:`_encode_batch`, with the stage
    named as the error report names it (``asr`` or ``encode``)."""

    def __init__(self, stage: str, exc: Exception) -> None:
        super().__init__(f"{_type_name(exc)}: {exc}")
        self.stage, self.exc = stage, exc


@contextmanager
def _stage(timer: _Timer, timed: str, reported: str) -> Iterator[None]:
    """Time the block as ``timed``; an Exception in it becomes a _StageFailed(``reported``)."""
    with timer(timed):
        try:
            yield
        except Exception as e:  # any library; KeyboardInterrupt/SystemExit pass
            raise _StageFailed(reported, e) from e


def _encode_batch(
    batch: list[Decoded], enc: Encoders, opts: ExtractOptions, timer: _Timer
) -> list[tuple[ClipFeatures, str]]:
    """Features and transcript of every clip of a decoded batch (all decodable)."""
    waves = [d.waveform for d in batch if d.waveform is not None]
    if opts.share_whisper:  # one encoder pass: the audio features', then decoding from it
        with _stage(timer, "audio", "encode"):
            windows = iter(enc.audio.encode_windows(waves) if waves else [])
            states = [next(windows) if d.waveform is not None else None for d in batch]
            audio = [
                None if s is None else s[: enc.audio.num_frames(d.waveform.size)]
                for d, s in zip(batch, states)
            ]  # (T_i, D_a), as encode() gives them
        with _stage(timer, "asr", "asr"):
            transcripts = [
                "" if s is None else enc.asr.transcribe(d.waveform, encoder_states=s).strip()
                for d, s in zip(batch, states)
            ]
    else:
        with _stage(timer, "asr", "asr"):
            transcripts = [
                enc.asr.transcribe(d.waveform).strip() if d.waveform is not None else ""
                for d in batch
            ]
        with _stage(timer, "audio", "encode"):
            audio_feats = iter(enc.audio.encode(waves) if waves else [])
            audio = [next(audio_feats) if d.waveform is not None else None for d in batch]
    with _stage(timer, "vision", "encode"):
        all_faces = [f for d in batch if d.faces for f in d.faces]
        vecs = _encode_images(enc.image, all_faces, opts.batch_size * 8) if all_faces else None
        vision, k = [], 0
        for d in batch:
            if d.faces:
                v = vecs[k : k + len(d.faces)]  # (n_crops, D_v)
                # vision_fps: each crop's feature over the frames it stands for (_decode_into)
                vision.append(v if d.repeats is None else np.repeat(v, d.repeats, axis=0))
                k += len(d.faces)
            else:
                vision.append(None)
    with _stage(timer, "text", "encode"):
        texts = [t for t in transcripts if t]
        tvecs, ttoks = (
            enc.text.encode(texts, token_states=opts.text_tokens) if texts else (None, None)
        )
        text, tokens, k = [], [], 0
        for t in transcripts:
            if t:
                text.append(tvecs[k])
                tokens.append(ttoks[k] if ttoks is not None else None)
                k += 1
            else:
                text.append(None)
                tokens.append(None)
    return [
        (ClipFeatures(d.source.clip_id, a, v, t, tok if opts.text_tokens else None), tr)
        for d, a, v, t, tok, tr in zip(batch, audio, vision, text, tokens, transcripts)
    ]


def _encode_images(encoder: ImageEncoder, images: list[np.ndarray], chunk: int) -> np.ndarray:
    parts = [encoder.encode(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    return np.concatenate(parts, axis=0)  # (N, D_v)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- driver


def extract(
    sources: list[Source],
    store: str | os.PathLike,
    encoders: Encoders,
    opts: ExtractOptions | None = None,
    *,
    input_errors: Iterable[dict] = (),
    progress: bool = True,
    clip_media: dict[str, ClipMedia] | None = None,
) -> ExtractSummary:
    """Extract ``sources`` into the feature store at ``store``; see the module docstring.

    ``clip_media``: when given, filled with clip id -> :class:`ClipMedia` for every clip
    this call writes (not for skipped or failed ones); nothing of it goes into the store.

    Raises StoreError, before writing anything, when the store cannot be opened for
    writing (other dims or settings, locked by another writer, not a store).
    """
    opts = opts or ExtractOptions()
    opts.check()  # fields may have been changed since construction
    encoders.check_sharing(opts)
    root = Path(store)
    t_start = time.perf_counter()
    summary = ExtractSummary(store=str(root), total=len(sources))
    timer = _Timer(summary)
    dims = {"audio": encoders.audio.dim, "vision": encoders.image.dim, "text": encoders.text.dim}
    errors: list[dict] = [
        {**e, "exception": e.get("exception")} for e in input_errors
    ]  # one schema for every line
    summary.total += len(errors)  # so that total = done + skipped + failed
    summary.failed += len(errors)
    wave_errors: list[dict] = []  # --waveforms: reported, but not counted in failed
    # Opened first: a store the writer refuses (other dims or settings, locked, a file)
    # gets no report or transcripts folder; nothing is written into it.
    writer = StoreWriter(
        root,
        dims=dims,
        text_tokens=opts.text_tokens,
        modalities=encoders.provenance(opts),
        shard_size=SHARD_SIZE,
        commit_clips=opts.commit_clips,
        commit_seconds=opts.commit_seconds,
        compact=True,
    )
    try:
        with (
            writer
        ):  # commits what is finished, even on Ctrl-C/SIGTERM; compacts after a normal run
            _run(
                sources,
                root,
                encoders,
                opts,
                writer,
                summary,
                timer,
                errors,
                progress,
                wave_errors,
                clip_media=clip_media,
            )
    except BaseException:
        summary.interrupted = True
        raise
    finally:  # also after a crash or Ctrl-C: what failed so far is reported
        summary.failed = len(errors)
        summary.waveforms_failed = len(wave_errors)
        summary.wall_seconds = time.perf_counter() - t_start
        _report(root, summary, errors + wave_errors)
    return summary


def _run(
    sources: list[Source],
    root: Path,
    encoders: Encoders,
    opts: ExtractOptions,
    writer: StoreWriter,
    summary: ExtractSummary,
    timer: _Timer,
    errors: list[dict],
    progress: bool,
    wave_errors: list[dict],
    clip_media: dict[str, ClipMedia] | None = None,
) -> None:
    (root / TRANSCRIPTS).mkdir(exist_ok=True)
    cache = (
        WaveformCache(
            root, create=True, max_seconds=opts.max_audio_seconds, sample_rate=SAMPLE_RATE
        )
        if opts.waveforms
        else None
    )
    todo = [s for s in sources if opts.force or s.clip_id not in writer]
    summary.skipped = len(sources) - len(todo)
    if summary.skipped:
        log.info(
            "%d of %d clips are already in %s: skipped (use --force to recompute)",
            summary.skipped,
            len(sources),
            root,
        )
    if cache is not None and summary.skipped:
        _cache_missing_waveforms(
            sources, root, writer, cache, opts, summary, timer, wave_errors, progress
        )
    bar = tqdm(
        total=len(todo), desc="extract", unit="clip", disable=not progress, dynamic_ncols=True
    )
    with closing(_decoded_in_order(todo, opts, encoders.face)) as decoded:
        for batch in _batches(decoded, opts.batch_size):
            ok = []
            for d in batch:
                summary.stage_seconds["decode"] += d.seconds
                if d.error is not None:
                    errors.append(
                        _error_record(
                            d.source.clip_id, d.source.media, "decode", d.error, d.exception
                        )
                    )
                else:
                    ok.append(d)
            for clip, transcript, d in _encode_isolating_failures(
                ok, encoders, opts, timer, errors
            ):
                with timer("write"):
                    if not _write_clip(
                        writer, root, cache, clip, transcript, d, opts, summary, errors, wave_errors
                    ):
                        continue
                summary.done += 1
                summary.media_seconds += d.media_seconds
                if clip_media is not None:
                    clip_media[clip.clip_id] = ClipMedia(d.media_seconds, d.vision_times)
                for m, miss in zip(("audio", "vision", "text"), clip.missing):
                    summary.missing[m] += int(miss)
            with timer("write"):
                writer.commit_if_due()  # by time: finished clips are durable within commit_seconds
            summary.failed = len(errors)
            bar.update(len(batch))
            bar.set_postfix(failed=summary.failed)
    bar.close()


def _write_clip(
    writer: StoreWriter,
    root: Path,
    cache: WaveformCache | None,
    clip: ClipFeatures,
    transcript: str,
    d: Decoded,
    opts: ExtractOptions,
    summary: ExtractSummary,
    errors: list[dict],
    wave_errors: list[dict],
) -> bool:
    """Validate, then write the transcript and waveform, then add the clip (so a committed
    clip always has them, even if the process dies right after the commit); False if the
    clip's values are invalid (recorded, stage ``write``). A failure to write into the
    store (a full disk) is a StoreError: it would fail every clip, so the run stops."""
    try:
        writer.check(clip)
    except (ValueError, TypeError) as e:  # e.g. non-finite features: this clip only
        errors.append(_error_record(clip.clip_id, d.source.media, "write", str(e), _type_name(e)))
        return False
    try:
        _write_text(root / TRANSCRIPTS / f"{clip.clip_id}.txt", transcript)
        if cache is not None:
            _cache_waveform(cache, d, summary, wave_errors)
        writer.add(clip, replace=opts.force)
    except OSError as e:
        raise StoreError(
            f"{root}: cannot write clip {clip.clip_id!r} ({_type_name(e)}: {e}); stopping, since "
            "every clip would fail. The clips committed so far are kept: fix the cause and run "
            "again to resume"
        ) from e
    return True


def _cache_waveform(
    cache: WaveformCache, d: Decoded, summary: ExtractSummary, wave_errors: list[dict]
) -> bool:
    """Cache ``d.waveform`` (or drop a stale file when the clip has no audio); False on failure."""
    try:
        if d.waveform is None:
            cache.discard(d.source.clip_id)  # only a --force rerun can find one
            return True
        cache.put(d.source.clip_id, d.waveform)
    except (OSError, ValueError) as e:
        wave_errors.append(
            _error_record(
                d.source.clip_id,
                d.source.media,
                "waveform",
                f"{type(e).__name__}: {e}",
                _type_name(e),
            )
        )
        return False
    summary.waveforms += 1
    return True


def _cache_missing_waveforms(
    sources: list[Source],
    root: Path,
    writer: StoreWriter,
    cache: WaveformCache,
    opts: ExtractOptions,
    summary: ExtractSummary,
    timer: _Timer,
    wave_errors: list[dict],
    progress: bool,
) -> None:
    """Clips already in the store whose audio is present but not cached: decode their audio
    only and cache it; no model runs and the store is not touched."""
    todo = [s for s in sources if s.clip_id in writer and s.clip_id not in cache]
    if not todo or opts.force:  # with --force every clip is recomputed (and cached) anyway
        return
    store = FeatureStore(root)  # committed clips: their audio missing flags
    todo = [s for s in todo if s.clip_id in store and not store.missing[store.index(s.clip_id), 0]]
    if not todo:
        return
    log.info(
        "%d clips already in %s have no cached waveform: decoding their audio", len(todo), root
    )
    bar = tqdm(
        total=len(todo), desc="waveforms", unit="clip", disable=not progress, dynamic_ncols=True
    )
    with closing(_decoded_in_order(todo, opts, None, decode=decode_waveform)) as decoded:
        for d in decoded:
            summary.stage_seconds["decode"] += d.seconds
            with timer("write"):
                if d.error is not None:
                    wave_errors.append(
                        _error_record(
                            d.source.clip_id, d.source.media, "waveform", d.error, d.exception
                        )
                    )
                elif d.waveform is None:
                    wave_errors.append(
                        _error_record(
                            d.source.clip_id,
                            d.source.media,
                            "waveform",
                            "no audio decoded, but the store has audio features for this clip",
                        )
                    )
                elif _cache_waveform(cache, d, summary, wave_errors):
                    summary.waveforms_added += 1
            bar.update(1)
    bar.close()


def _report(root: Path, summary: ExtractSummary, errors: list[dict]) -> None:
    """Append this run's failures to the error report and write the run summary."""
    if errors:
        with open(root / ERRORS_FILE, "a", encoding="utf-8") as fh:
            fh.writelines(
                json.dumps({**e, "run": summary.started}, ensure_ascii=True) + "\n" for e in errors
            )
        summary.errors_file = str(root / ERRORS_FILE)
        for e in errors[:20]:
            log.warning("failed: %s (%s): %s", e["path"], e["stage"], e["reason"])
        if len(errors) > 20:
            log.warning("... and %d more failures, see %s", len(errors) - 20, root / ERRORS_FILE)
    (root / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2), encoding="utf-8")


def _encode_isolating_failures(
    batch: list[Decoded], enc: Encoders, opts: ExtractOptions, timer: _Timer, errors: list[dict]
) -> list[tuple[ClipFeatures, str, Decoded]]:
    """Encode a batch; if it fails, encode its clips one by one so only the bad clip fails."""
    if not batch:
        return []
    try:
        return [(c, t, d) for (c, t), d in zip(_encode_batch(batch, enc, opts, timer), batch)]
    except Exception as e:  # noqa: BLE001 - any library's error fails only its clip
        stage, exc = (e.stage, e.exc) if isinstance(e, _StageFailed) else ("encode", e)
        if len(batch) == 1:
            d = batch[0]
            errors.append(
                _error_record(
                    d.source.clip_id,
                    d.source.media,
                    stage,
                    f"{_type_name(exc)}: {exc}",
                    _type_name(exc),
                )
            )
            return []
        log.warning(
            "a batch of %d clips failed (%s: %s: %s); retrying clip by clip",
            len(batch),
            stage,
            _type_name(exc),
            exc,
        )
        out = []
        for d in batch:
            out += _encode_isolating_failures([d], enc, opts, timer, errors)
        return out


def summary_counts(summary: ExtractSummary) -> str:
    c = Counter(summary.missing)
    return (
        f"{summary.done} done, {summary.skipped} skipped, {summary.failed} failed; missing: "
        f"audio {c['audio']}, vision {c['vision']}, text {c['text']}; "
        f"{summary.media_seconds:.0f} s of media in {summary.wall_seconds:.0f} s"
    ) + (
        f"; waveforms cached: {summary.waveforms} ({summary.waveforms_added} for clips already in the store), "
        f"{summary.waveforms_failed} failed"
        if summary.waveforms or summary.waveforms_failed
        else ""
    )
