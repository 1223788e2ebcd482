"""Predict from media files: extract features the way a run's were extracted, then predict.

The whole chain for new clips (docs/method.md sections 3-4): media -> features (with the run's
extraction profile and options) -> the run's model -> six intensities per clip.

1. The run's ``features.json`` (written by training, see :mod:`taemi.run`)
   says how its input features were made: the extraction ``profile`` and, per modality,
   the backbone and settings. The options that shape features are taken from it:
   ``max_seconds`` (audio), ``max_frames``, ``frame_policy``, ``vision_fps`` (absent:
   every frame) and face cropping on/off (vision), text token states and ``share_whisper``
   (text; absent: transcripts from their own encoder pass). A run without ``features.json`` (imported release
   weights, older runs) needs ``profile=`` and then uses the extraction defaults (12 s of
   audio, the first 400 frames, face crops).
2. The profile's models are loaded once per process (:func:`load_encoders_once`) and
   must be the run's: a backbone (or speech recogniser) other than the recorded one is
   an error naming the model to pass (``--model role=ID_OR_DIR``), and so is a face
   cropper detecting on other frames (``face.detect_every``, absent: every frame; the
   loaded cropper is made with the run's); the Whisper audio window (audio ``window_s``,
   absent: 30 s) is loaded as recorded; other setting differences (device, library
   versions) are logged and reported. The image encoder's precision (vision ``precision``,
   absent: fp32) is loaded as recorded, and an encoder of another precision is an error.
   When the device is certain without torch (:func:`device_without_torch`), they start
   loading in a background thread before the run's model (and torch) loads.
3. :func:`taemi.extract.pipeline.extract` writes the clips into a feature store, a
   temporary one unless ``features_dir`` is given (clips already there are reused, by
   clip id = file name without extension, like ``taemi extract``). A clip without a
   modality (an MP3 has no video; no face found; an empty transcript) still gets a
   prediction: the model substitutes its learned missing token (docs/method.md section 5). A file
   that cannot be decoded is reported with its reason; the others are still predicted.
4. The run's model predicts every extracted clip; values are clipped to [0, 1] unless
   ``clip=False`` (as for a submission, docs/method.md section 8). The fusion model is also loaded
   once per process (:func:`load_run_once`; reloaded only when its weights file changes).

Every result carries ``timings``: seconds per stage of this call (``load`` = models loaded
by this call, 0 when cached; ``decode`` incl. face cropping, ``asr``, ``audio``, ``vision``,
``text``, ``write`` from the extraction, summed over its worker threads; ``extract`` its
wall time; ``fusion`` = the fusion model over the extracted clips; ``total``), and
``media_seconds``, the media the features cover, so real-time factor = media / total.

The temporary store is removed however the call ends: on an exception, Ctrl-C, or
SIGTERM (in the main thread, SIGTERM raises :class:`taemi.signals.Terminated`, a
KeyboardInterrupt, for the duration of the call).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taemi import MODALITIES
from taemi.extract import profiles
from taemi.extract.pipeline import (
    ERRORS_FILE,
    TRANSCRIPTS,
    Encoders,
    ExtractOptions,
    extract,
    find_sources,
)
from taemi.run import (
    CONFIG_FILE,
    FEATURES_FILE,
    RunFolderError,
    load_features_record,
    weights_file,
)
from taemi.signals import sigterm_raises

if TYPE_CHECKING:  # torch comes with it: imported when a run is loaded, not with this module
    from taemi.inference import Predictor

__all__ = [
    "ClipPrediction",
    "MediaPlan",
    "MediaPredictions",
    "extraction_plan",
    "format_table",
    "load_encoders_once",
    "load_run_once",
    "media_plan",
    "predict_media",
]

log = logging.getLogger(__name__)


@dataclass
class ClipPrediction:
    """One predicted clip."""

    clip_id: str  # the file name without extension
    path: str  # the media file
    intensities: dict[str, float]  # emotion -> value (clipped to [0, 1] unless clip=False)
    present: dict[
        str, bool
    ]  # audio/vision/text -> the modality was extracted (False: missing token used)
    transcript: str  # what speech recognition heard ('' = text missing)


@dataclass
class MediaPredictions:
    """Result of :func:`predict_media`."""

    run: str
    weights: str  # best | last
    emotions: tuple[str, ...]
    clipped: bool
    profile: str
    options: dict[
        str, Any
    ]  # the extraction options used (max_audio_seconds, max_frames, frame_policy, face, text_tokens)
    store: str | None  # the feature store written (None: a temporary one, deleted)
    clips: list[ClipPrediction] = field(default_factory=list)  # sorted by clip id
    failures: list[dict[str, str | None]] = field(
        default_factory=list
    )  # {clip_id, path, stage, reason}
    provenance_differences: list[str] = field(
        default_factory=list
    )  # settings that differ from the run's
    timings: dict[str, float] = field(
        default_factory=dict
    )  # stage -> seconds of this call (module docstring)
    media_seconds: float = 0.0  # media the extracted features cover (for the real-time factor)

    def values(self) -> np.ndarray:
        """(N, E) float32 intensities in ``clips`` order."""
        rows = [[c.intensities[e] for e in self.emotions] for c in self.clips]
        return np.array(rows, dtype=np.float32).reshape(
            len(self.clips), len(self.emotions)
        )  # the model's float32

    def to_json(self) -> dict[str, Any]:
        extraction = {
            "profile": self.profile,
            "options": self.options,
            "store": self.store,
            "provenance_differences": self.provenance_differences,
        }
        clips = [
            {
                "id": c.clip_id,
                "path": c.path,
                "intensities": c.intensities,
                "present": c.present,
                "missing": [m for m, p in c.present.items() if not p],
                "transcript": c.transcript,
            }
            for c in self.clips
        ]
        return {
            "run": self.run,
            "weights": self.weights,
            "clipped": self.clipped,
            "emotions": list(self.emotions),
            "extraction": extraction,
            "clips": clips,
            "failures": self.failures,
            "timings": {"media_seconds": self.media_seconds, "stage_seconds": self.timings},
        }

    def write(self, csv_path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """The ABAW CSV at ``csv_path`` and the JSON (per clip: intensities, present
        modalities, transcript; failures) next to it with the suffix ``.json``."""
        from taemi.eval.submission import write_submission

        csv_path = Path(csv_path)
        json_path = csv_path.with_suffix(".json")
        if json_path == csv_path:
            raise ValueError(f"--out {csv_path}: give the CSV a name not ending in .json")
        # values are already clipped (or deliberately raw): write them as they are
        write_submission(
            csv_path, [c.clip_id for c in self.clips], self.emotions, self.values(), clip=False
        )
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, json_path)
        return csv_path, json_path


# --------------------------------------------------------------------------- the run's extraction


def extraction_plan(
    features: dict | None, profile: str | None, *, run: str = "RUN"
) -> tuple[str, ExtractOptions, bool]:
    """(profile, extraction options, face cropping on) that reproduce a run's features.

    ``features`` is the run's ``features.json`` (None when it has none: then ``profile``
    is required and the extraction defaults apply). A ``profile`` that contradicts the
    recorded one is an error.
    """
    if features is None:
        if profile is None:
            raise ValueError(
                f"{run} has no {FEATURES_FILE} (imported release weights, or a run trained before runs recorded "
                "their features), so how its features were extracted is unknown: pass --profile offline|paper "
                "(the extraction defaults then apply: 12 s of audio, the first 400 frames, face crops)"
            )
        log.warning(
            "%s has no %s: extracting with the %s profile's defaults", run, FEATURES_FILE, profile
        )
        return profile, ExtractOptions(), True
    mods = features.get("modalities") or {}
    if set(mods) != set(MODALITIES):
        raise ValueError(
            f"{run}/{FEATURES_FILE} records no extraction provenance for {sorted(set(MODALITIES) - set(mods))} "
            "(the store was not written by taemi extract): its features cannot be extracted from media"
        )
    recorded = {m: (mods[m].get("settings") or {}).get("profile") for m in MODALITIES}
    if len(set(recorded.values())) != 1 or None in recorded.values():
        backbones = {m: mods[m].get("backbone") for m in MODALITIES}
        raise ValueError(
            f"{run} was trained on features without one extraction profile (profiles {recorded}, backbones "
            f"{backbones}), e.g. synthetic features: they cannot be extracted from media"
        )
    run_profile = recorded["audio"]
    if profile is not None and profile != run_profile:
        raise ValueError(
            f"--profile {profile}: {run} was trained on features of the {run_profile!r} profile "
            f"({run}/{FEATURES_FILE}); features of another profile do not fit its model"
        )
    a, v, t = (mods[m]["settings"] for m in MODALITIES)
    try:
        opts = ExtractOptions(
            max_audio_seconds=float(a["max_seconds"]),
            max_frames=int(v["max_frames"]),
            frame_policy=str(v["frame_policy"]),
            # absent: every frame (runs of the exact path, and those recorded before the setting)
            vision_fps=None if v.get("vision_fps") is None else float(v["vision_fps"]),
            text_tokens=bool(t["token_states"]),
            share_whisper=bool(t.get("share_whisper", False)),
        )
        face = v["face"] is not None
    except KeyError as e:
        raise ValueError(
            f"{run}/{FEATURES_FILE}: the recorded settings lack {e.args[0]!r}"
        ) from None
    return run_profile, opts, face


@dataclass
class MediaPlan:
    """A run, and how to extract features from media that fit it (:func:`media_plan`): what
    :func:`predict_media` and ``taemi serve`` share."""

    run: str  # as the caller named it (messages quote it)
    which: str  # best | last
    predictor: Predictor  # the run's model (:func:`load_run_once`)
    features: dict | None  # the run's features.json (None: it has none)
    profile: str  # the extraction profile
    opts: ExtractOptions  # the run's extraction options, with the caller's batch size and workers
    face: bool  # face crops on
    detect_every: int  # the face detector's detect_every
    encoder_precision: str  # the image encoder's precision (not the fusion model's)
    whisper_window: float = 30.0  # the offline profile's Whisper audio window, seconds

    def load_encoders(
        self,
        device: str,
        *,
        models: Mapping[str, str] | None = None,
        trust_remote_code: bool = False,
        allow_download: bool = False,
    ) -> Encoders:
        """The profile's models with the run's settings, loaded once per process
        (:func:`load_encoders_once`); check them with :func:`check_provenance`."""
        return load_encoders_once(
            self.profile,
            face=self.face,
            face_detect_every=self.detect_every,
            image_precision=self.encoder_precision,
            whisper_window=self.whisper_window,
            device=device,
            batch_size=self.opts.batch_size,
            models=models,
            trust_remote_code=trust_remote_code,
            allow_download=allow_download,
        )

    def options(self) -> dict[str, Any]:
        """The extraction options that shape features, as results report them."""
        opts = self.opts
        return {
            "max_audio_seconds": opts.max_audio_seconds,
            "max_frames": opts.max_frames,
            "frame_policy": opts.frame_policy,
            **({} if opts.vision_fps is None else {"vision_fps": opts.vision_fps}),
            **({"share_whisper": True} if opts.share_whisper else {}),
            "face": self.face,
            "text_tokens": opts.text_tokens,
        }


def media_plan(
    run: str | os.PathLike[str],
    which: str = "best",
    *,
    profile: str | None = None,
    batch_size: int = 8,
    workers: int = 2,
) -> MediaPlan:
    """Load ``run`` (:func:`load_run_once`) and plan the extraction that reproduces its
    features (:func:`extraction_plan`; module docstring, steps 1-2). No encoder is loaded.

    Raises ValueError as :func:`extraction_plan` does, and for a bad ``batch_size`` or
    ``workers`` (:class:`ExtractOptions` checks them)."""
    from taemi.train.modes import mode_for

    predictor = load_run_once(run, which)  # first: a wrong run folder fails before any model loads
    plan = _encoder_plan(run, which, profile=profile, batch_size=batch_size, workers=workers)
    # waveforms: a fine-tuned run's backbones read the raw audio (cached as extracted)
    opts = replace(plan.opts, waveforms=mode_for(predictor.cfg).reads_waveforms)
    return replace(plan, predictor=predictor, opts=opts)


def _encoder_plan(
    run: str | os.PathLike[str],
    which: str,
    *,
    profile: str | None,
    batch_size: int,
    workers: int,
) -> MediaPlan:
    """:func:`media_plan` without the run's model (``predictor`` None, no waveforms): what
    the encoders need, read from the run's ``features.json`` without importing torch."""
    run_name = str(run)
    features = load_features_record(run)
    profile, opts, face = extraction_plan(features, profile, run=run_name)
    vision_settings = None if features is None else features["modalities"]["vision"]["settings"]
    # replace() checks the options: a bad batch size or worker count fails before any model loads
    return MediaPlan(
        run=run_name,
        which=which,
        predictor=None,  # type: ignore[arg-type]  # media_plan sets it
        features=features,
        profile=profile,
        opts=replace(opts, batch_size=batch_size, workers=workers),
        face=face,
        detect_every=1 if vision_settings is None else face_detect_every(vision_settings),
        # the image encoder's precision; the fusion model's autocast precision is the caller's
        encoder_precision="fp32" if vision_settings is None else image_precision(vision_settings),
        whisper_window=whisper_window(features),
    )


def device_without_torch(device: str) -> str | None:
    """The device type ``device`` resolves to (:func:`taemi.runtime.resolve_device`) when
    that is certain without importing torch: ``"cpu"`` when asked for, or for ``"auto"`` on
    Linux without NVIDIA's driver (no ``/proc/driver/nvidia``, no ``/dev/nvidiactl``) and
    on macOS (no CUDA). None otherwise: torch decides."""
    if device == "cpu":
        return "cpu"
    if device != "auto":
        return None
    if sys.platform == "darwin":
        return "cpu"
    if sys.platform.startswith("linux") and not any(
        Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl")
    ):
        return "cpu"
    return None


@dataclass
class _Preload:
    """Encoders loading in a background thread (:func:`_preload_encoders`)."""

    device: str  # the device type they load on
    future: Future  # -> Encoders


def _preload_encoders(
    run: str | os.PathLike[str],
    which: str,
    *,
    profile: str | None,
    batch_size: int,
    workers: int,
    device: str,
    load: Mapping[str, Any],
) -> _Preload | None:
    """Start loading the encoders of ``run``'s extraction in a thread, so that they load
    while the main thread imports torch and loads the run's model (a fresh ``taemi
    predict`` process on 2 cores: 0.27 s less, benchmarks/README.md). Only when the
    run's own checks cannot fail first: the run folder has its config and weights, the
    extraction plan is valid and the device is known without torch
    (:func:`device_without_torch`); otherwise None and the caller loads them in order,
    raising its errors before any model loads. Weights that are there but unreadable,
    and a fusion-model precision the device refuses, are found after this load started.
    ``load``: the keyword arguments of :meth:`MediaPlan.load_encoders` but the device."""
    dev = device_without_torch(device)
    root = Path(run)
    if dev is None or not (root / CONFIG_FILE).is_file() or not weights_file(root, which).is_file():
        return None
    try:
        plan = _encoder_plan(run, which, profile=profile, batch_size=batch_size, workers=workers)
    except (ValueError, RunFolderError):
        return None  # media_plan raises it in its order
    pool = ThreadPoolExecutor(1, thread_name_prefix="taemi-preload")
    try:
        return _Preload(dev, pool.submit(plan.load_encoders, dev, **load))
    finally:
        pool.shutdown(wait=False)  # the thread ends when the load does


_ENCODERS: dict[tuple, Encoders] = {}


def load_encoders_once(
    profile: str,
    *,
    face: bool,
    face_detect_every: int = 1,
    image_precision: str = "fp32",
    whisper_window: float = 30.0,
    device: str = "cpu",
    batch_size: int = 8,
    models: Mapping[str, str] | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
) -> Encoders:
    """:func:`taemi.extract.profiles.load_encoders`, cached for the life of the process
    (keyed by every argument): predicting again does not load the models again."""
    key = (
        profile,
        face,
        face_detect_every,
        image_precision,
        whisper_window,
        device,
        batch_size,
        tuple(sorted((models or {}).items())),
        trust_remote_code,
        allow_download,
    )
    if key not in _ENCODERS:
        _ENCODERS[key] = profiles.load_encoders(
            profile,
            device=device,
            batch_size=batch_size,
            models=dict(models or {}),
            face=face,
            face_detect_every=face_detect_every,
            image_precision=image_precision,
            whisper_window=whisper_window,
            trust_remote_code=trust_remote_code,
            allow_download=allow_download,
        )
    return _ENCODERS[key]


_RUNS: dict[tuple, Predictor] = {}


def load_run_once(run: str | os.PathLike[str], which: str = "best") -> Predictor:
    """:meth:`taemi.inference.Predictor.from_run`, cached for the life of the process, keyed
    by the run folder, ``which`` and the weights' and config's modification times (a run
    trained again is reloaded). The model is in eval mode; callers share the predictor."""
    root = Path(run).resolve()
    stamp = tuple(
        p.stat().st_mtime_ns if p.is_file() else None
        for p in (root / CONFIG_FILE, weights_file(root, which))
    )
    key = (str(root), which, stamp)
    if key not in _RUNS:
        from taemi.inference import Predictor

        _RUNS.clear()  # one run at a time: an older version of it is never used again
        _RUNS[key] = Predictor.from_run(run, which)
    return _RUNS[key]


def check_provenance(
    features: dict | None, encoders: Encoders, opts: ExtractOptions, *, run: str = "RUN"
) -> list[str]:
    """The loaded models must be the run's. A different backbone or speech recogniser is an
    error; returns the settings that differ otherwise (device, library versions ...)."""
    if features is None:
        return []
    now = encoders.provenance(opts)
    mods = features["modalities"]
    role = {"audio": "audio", "vision": "vision", "text": "text"}
    pairs = [(role[m], mods[m]["backbone"], now[m]["backbone"]) for m in MODALITIES]
    pairs.append(("asr", mods["text"]["settings"].get("asr"), now["text"]["settings"].get("asr")))
    for r, was, is_ in pairs:
        if was != is_:
            raise ValueError(
                f"{run}'s {r} model was {was!r} but the {encoders.profile} profile loaded {is_!r}; "
                f"pass --model {r}=<that model's hub id or folder> to extract features that fit the run"
            )
    was_k, now_k = (face_detect_every(p["vision"]["settings"]) for p in (mods, now))
    if was_k != now_k:
        raise ValueError(
            f"{run}'s face crops detected faces on every {was_k} frame(s) (face.detect_every), "
            f"the face cropper given detects on every {now_k}: its crops would not fit the run"
        )
    was_p, now_p = (image_precision(p["vision"]["settings"]) for p in (mods, now))
    if was_p != now_p:
        raise ValueError(
            f"{run}'s vision features were made with the image encoder in {was_p} "
            f"(vision settings 'precision'), the encoder given runs in {now_p}: its features "
            "would not be the run's"
        )
    was_w, now_w = whisper_window(features), whisper_window({"modalities": now})
    if was_w != now_w:
        raise ValueError(
            f"{run}'s audio features were made with a {was_w:g} s Whisper window (audio "
            f"settings 'window_s', taemi extract --whisper-window), the encoder given uses "
            f"{now_w:g} s: its features would not be the run's"
        )
    diffs: list[str] = []
    for m in MODALITIES:
        _diff(mods[m]["settings"], json.loads(json.dumps(now[m]["settings"])), f"{m}.", diffs)
    if diffs:
        log.warning("extraction settings that differ from %s's: %s", run, "; ".join(diffs))
    return diffs


def face_detect_every(vision_settings: Mapping[str, Any]) -> int:
    """The face detector's ``detect_every`` in a vision provenance's settings (1 when the
    face settings do not record it: the per-frame policy, or no face crops)."""
    face = vision_settings.get("face")
    return 1 if not isinstance(face, Mapping) else int(face.get("detect_every", 1))


def whisper_window(features: Mapping[str, Any] | None) -> float:
    """The offline profile's Whisper audio window (``taemi extract --whisper-window``) that a
    run's features were made with: the audio settings' ``window_s``; 30 s (Whisper's own
    window, the exact path) when not recorded or when the audio model is not Whisper's
    encoder (the paper profile's wav2vec2 has no window)."""
    if features is None:
        return 30.0
    settings = features["modalities"]["audio"].get("settings") or {}
    if settings.get("output") != "encoder last hidden state":  # not WhisperEncoder's record
        return 30.0
    return float(settings.get("window_s", 30.0))


def image_precision(vision_settings: Mapping[str, Any]) -> str:
    """The image encoder's precision in a vision provenance's settings ("fp32" when not
    recorded: the exact path, and every store made before int8 existed)."""
    return str(vision_settings.get("precision", "fp32"))


def _diff(was: Any, now: Any, prefix: str, out: list[str]) -> None:
    if isinstance(was, dict) and isinstance(now, dict):
        for k in sorted(set(was) | set(now)):
            _diff(was.get(k), now.get(k), f"{prefix}{k}.", out)
    elif was != now:
        out.append(f"{prefix.rstrip('.')}: {was!r} (run) vs {now!r} (now)")


# --------------------------------------------------------------------------- predicting


def predict_media(
    run: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    which: str = "best",
    features_dir: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    models: Mapping[str, str] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 8,
    workers: int = 2,
    clip: bool = True,
    encoders: Encoders | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    progress: bool = False,
) -> MediaPredictions:
    """Predict the clips of ``inputs`` (media files, folders, list files) with ``run``.

    See the module docstring. ``encoders`` replaces the profile's models (tests, custom
    stand-ins); otherwise they are loaded once per process. Failing files are in
    ``failures`` with their reason; they never stop the others.

    Raises:
        ValueError: the run's extraction cannot be reproduced (no features.json and no
            ``profile``, a contradicting profile, other models), or no input at all.
        FileNotFoundError: an input path does not exist, or no media in the inputs.
    """
    from taemi.store import FeatureStore, StoreError, check_writable

    t_start = time.perf_counter()
    run_name = str(run)
    load = {
        "models": models,
        "trust_remote_code": trust_remote_code,
        "allow_download": allow_download,
    }
    try:  # once, before the run loads; an error is raised after the run's own checks
        if features_dir is not None:
            check_writable(features_dir)  # a store that cannot take the features
        found: tuple[list, list[dict]] | Exception = find_sources(inputs)
    except (OSError, ValueError, StoreError) as e:
        found = e
    preload = None  # only for inputs that pass: their errors must not waste a model load
    if encoders is None and not isinstance(found, Exception) and found[0]:
        preload = _preload_encoders(
            run,
            which,
            profile=profile,
            batch_size=batch_size,
            workers=workers,
            device=device,
            load=load,
        )
    from taemi.runtime import resolve_device, resolve_precision  # torch: after the preload starts

    # first: a wrong run folder fails before any model loads
    plan = media_plan(run, which, profile=profile, batch_size=batch_size, workers=workers)
    predictor, cfg, features, profile, opts = (
        plan.predictor,
        plan.predictor.cfg,
        plan.features,
        plan.profile,
        plan.opts,
    )
    if isinstance(found, Exception):  # before the models load
        raise found
    sources, input_errors = found
    if not sources and not input_errors:
        raise FileNotFoundError(f"no media files found in {', '.join(map(str, inputs))}")
    torch_device = resolve_device(device)
    model_precision = resolve_precision(precision, torch_device)  # checked before extracting
    if preload is not None and preload.device == torch_device.type:
        encoders = preload.future.result()
    elif encoders is None:
        encoders = plan.load_encoders(torch_device.type, **load)
    t_loaded = time.perf_counter()
    diffs = check_provenance(features, encoders, opts, run=run_name)
    options = plan.options()
    result = MediaPredictions(
        run=run_name,
        weights=which,
        emotions=tuple(cfg.data.emotions),
        clipped=clip,
        profile=profile,
        options=options,
        store=None if features_dir is None else str(features_dir),
        provenance_differences=diffs,
    )

    # SIGTERM raises (like Ctrl-C) so that the temporary folder is removed on the way out
    with sigterm_raises(), tempfile.TemporaryDirectory(prefix="taemi-predict-") as tmp:
        root = Path(features_dir) if features_dir is not None else Path(tmp) / "features"
        errors_file = root / ERRORS_FILE
        seen_errors = _count_lines(errors_file)
        summary = extract(
            sources, root, encoders, opts, input_errors=input_errors, progress=progress
        )
        t_extracted = time.perf_counter()
        result.timings = {
            "load": t_loaded - t_start,
            **summary.stage_seconds,
            "extract": t_extracted - t_loaded,
        }
        result.media_seconds = summary.media_seconds
        result.failures = [
            {k: e.get(k) for k in ("clip_id", "path", "stage", "reason")}
            for e in _read_jsonl(errors_file, seen_errors)
        ]
        if not root.is_dir() or not (root / "manifest.json").is_file():
            result.timings["total"] = time.perf_counter() - t_start
            return result  # nothing could be extracted: every input failed
        store = FeatureStore(root)
        predictor.check_store(store)
        done = [s for s in sources if s.clip_id in store]
        if not done:
            result.timings["total"] = time.perf_counter() - t_start
            return result
        ids = [s.clip_id for s in done]
        predictor.on(torch_device, model_precision)
        pred = predictor.predict(predictor.dataset(store, ids=ids))
        result.timings["fusion"] = time.perf_counter() - t_extracted
        values = np.clip(pred, 0.0, 1.0) if clip else pred  # (N, E)
        for s, row in zip(done, values):
            missing = store.missing[store.index(s.clip_id)]  # (3,) audio, vision, text
            transcript_file = root / TRANSCRIPTS / f"{s.clip_id}.txt"
            result.clips.append(
                ClipPrediction(
                    clip_id=s.clip_id,
                    path=str(s.media),
                    intensities={e: float(v) for e, v in zip(result.emotions, row)},
                    present={m: not bool(x) for m, x in zip(MODALITIES, missing)},
                    transcript=transcript_file.read_text(encoding="utf-8").strip()
                    if transcript_file.is_file()
                    else "",
                )
            )
    result.timings["total"] = time.perf_counter() - t_start
    log.info(
        "predicted %d clips (%.1f s of media) in %.2f s: %s",
        len(result.clips),
        result.media_seconds,
        result.timings["total"],
        ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()),
    )
    return result


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def _read_jsonl(path: Path, skip: int) -> list[dict]:
    """The records of ``path`` after its first ``skip`` lines (this run's error records)."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for i, line in enumerate(fh) if i >= skip and line.strip()]


def format_table(res: MediaPredictions) -> str:
    """One line per clip: id, the intensities, the modalities present (or what is missing);
    then one line per failed input with its reason."""
    width = max([len("clip"), *(len(c.clip_id) for c in res.clips)]) + 2
    cols = [max(len(e), 6) + 2 for e in res.emotions]
    head = (
        f"{'clip':<{width}}"
        + "".join(f"{e:>{w}}" for e, w in zip(res.emotions, cols))
        + "  modalities"
    )
    lines = [head]
    for c in res.clips:
        missing = [m for m, p in c.present.items() if not p]
        mods = (
            "all three"
            if not missing
            else f"{' + '.join(m for m, p in c.present.items() if p) or 'none'} "
            f"({', '.join(missing)} missing)"
        )
        vals = "".join(f"{c.intensities[e]:>{w}.3f}" for e, w in zip(res.emotions, cols))
        lines.append(f"{c.clip_id:<{width}}{vals}  {mods}")
    for f in res.failures:
        lines.append(f"FAILED {f['path']} ({f['stage']}): {f['reason']}")
    lines.append(
        f"{len(res.clips)} predicted, {len(res.failures)} failed; "
        f"{'clipped to [0, 1]' if res.clipped else 'raw values (not clipped)'}; "
        f"features: {res.profile} profile, {res.options['max_frames']} frames ({res.options['frame_policy']}), "
        + (
            f"{res.options['vision_fps']:g} vision features/s, "
            if "vision_fps" in res.options
            else ""
        )
        + f"faces {'cropped' if res.options['face'] else 'not cropped'}"
        + (
            "; transcripts from the audio features' Whisper pass"
            if res.options.get("share_whisper")
            else ""
        )
    )
    return "\n".join(lines)
