"""The work behind ``taemi serve``, without HTTP: models loaded once, requests admitted into
a bounded queue, features extracted in a thread pool, the fusion model micro-batched.

One request's life (:mod:`taemi.serve.app` drives it):

1. admission (:meth:`Service.admit`): at most ``queue_size`` requests are in the service at
   once (receiving, waiting for or in extraction, in fusion); the next one is refused
   (503 with ``Retry-After``) before its body is read;
2. its files are streamed into a private temporary folder (:mod:`taemi.serve.uploads`);
3. :meth:`Service.extract_request`, in a pool of ``workers`` threads: the files become a
   feature store in that folder exactly as ``taemi predict`` makes one
   (:func:`taemi.predict_media.media_plan`: the run's profile, models and extraction
   options; :func:`taemi.extract.pipeline.extract`), and its clips are read back as the
   run's dataset items. A file that cannot be decoded is a failure of that file (422), not
   of the request; an exception of the extraction itself fails this request only (500);
4. each clip goes to the :class:`~taemi.serve.batcher.MicroBatcher`, whose one thread runs
   the fusion model on clips of several requests at once (:meth:`Service.fuse`, through
   :meth:`taemi.inference.Predictor.predict_items`), with the cross-attention weights;
5. the folder is deleted whatever happened.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taemi import MODALITIES
from taemi.extract.pipeline import (
    ERRORS_FILE,
    STAGES,
    TRANSCRIPTS,
    ClipMedia,
    Encoders,
    Source,
    extract,
)
from taemi.predict_media import check_provenance, media_plan
from taemi.run import read_metrics
from taemi.serve.batcher import Batched, MicroBatcher
from taemi.serve.errors import ApiError
from taemi.serve.uploads import Upload

__all__ = ["TIMINGS", "ClipInput", "ExtractedRequest", "Fused", "ServeSettings", "Service"]

log = logging.getLogger(__name__)

#: The seconds each clip's answer reports (``timings``): the upload, its wait in the queue,
#: its request's extraction and that extraction's stages, the wait for a fusion
#: micro-batch, the fusion model, and the whole (see the README).
TIMINGS = ("upload", "queue", "extract", *STAGES, "fusion_wait", "fusion", "total")


@dataclass
class ServeSettings:
    """``taemi serve``'s options (the CLI flags of the same names)."""

    run: str  # the run folder
    which: str = "best"  # best | last weights
    profile: str | None = None  # extraction profile, when the run has no features.json
    models: Mapping[str, str] = field(default_factory=dict)  # role -> hub id or folder
    device: str = "auto"  # the fusion model's and the encoders' device
    precision: str = "fp32"  # the fusion model's autocast precision
    token: str | None = None  # bearer token required on /v1/* (health excepted); None: open
    max_upload_bytes: int = 200 * 2**20  # body size limit of one request
    batch_size: int = 8  # clips per fusion micro-batch
    max_wait_ms: float = 20.0  # how long a clip waits for others to join its micro-batch
    queue_size: int = 32  # requests in the service at once; more get 503
    workers: int = 1  # extraction threads (requests extracted at once)
    extract_batch_size: int = 8  # clips per encoder batch within one request
    tmp_root: str | None = None  # where request folders are made (None: the system's temp)
    trust_remote_code: bool = False  # paper profile: GTE's model code
    allow_download: bool = False  # paper profile: let Hugging Face download

    def check(self) -> None:
        problems = []
        for name, low in (("batch_size", 1), ("queue_size", 1), ("workers", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                problems.append(
                    f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}"
                )
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms <= 10_000):
            problems.append(f"--max-wait-ms must be in [0, 10000], got {self.max_wait_ms!r}")
        if not (isinstance(self.max_upload_bytes, int) and self.max_upload_bytes >= 1):
            problems.append(
                f"--max-upload-mb must be positive, got {self.max_upload_bytes!r} bytes"
            )
        if self.token is not None and not self.token.strip():
            problems.append("--token (or TAEMI_SERVE_TOKEN) is empty")
        if problems:
            raise ValueError("taemi serve: " + "; ".join(problems))


@dataclass
class ClipInput:
    """One extracted clip, ready for the fusion model."""

    upload: Upload
    item: Any  # the run's dataset item (taemi.data.dataset.Item for a frozen-feature run)
    collate: Callable[[list], Any]  # its dataset's collator (the same for every request)
    present: dict[str, bool]  # audio/vision/text extracted (False: the missing token is used)
    transcript: str
    media: ClipMedia  # media seconds and the vision rows' timestamps


@dataclass
class ExtractedRequest:
    clips: list[ClipInput]
    failures: list[dict[str, Any]]  # {"id", "filename", "status", "code", "error"}
    timings: dict[str, float]  # queue, extract and the extraction's stages (seconds)


@dataclass
class Fused:
    """The fusion model's output for one clip."""

    raw: np.ndarray  # (E,) float32, unclipped
    attention: dict[str, np.ndarray | None]  # audio/vision -> (T,) weights over valid steps


def _missing_reason(m: str, present: dict[str, bool], face: bool) -> str | None:
    if present[m]:
        return None
    if m == "audio":
        return "no audio stream in the file (or it decodes to no samples)"
    if m == "vision":
        if face:
            return "no video stream in the file, or no face found in its frames"
        return "no video stream in the file (or it decodes to no frames)"
    if present["audio"]:
        return "no speech recognised in the audio"
    return "no audio to transcribe"


class Service:
    """The loaded run and encoders, the request queue, the extraction pool, the batcher.

    Everything is loaded here, once (the run, the profile's encoders with the run's
    settings). ``encoders`` replaces the profile's models (tests)."""

    def __init__(self, settings: ServeSettings, *, encoders: Encoders | None = None) -> None:
        from taemi.runtime import resolve_device, resolve_precision

        settings.check()
        self.settings = settings
        t0 = time.perf_counter()
        self.plan = media_plan(
            settings.run,
            settings.which,
            profile=settings.profile,
            batch_size=settings.extract_batch_size,
            workers=1,  # decoding threads per request: the pool runs requests side by side
        )
        self.predictor = self.plan.predictor
        self.device = resolve_device(settings.device)
        self.precision = resolve_precision(settings.precision, self.device)
        self.encoders = encoders or self.plan.load_encoders(
            self.device.type,
            models=settings.models,
            trust_remote_code=settings.trust_remote_code,
            allow_download=settings.allow_download,
        )
        self.provenance_differences = check_provenance(
            self.plan.features, self.encoders, self.plan.opts, run=self.plan.run
        )
        self.predictor.on(self.device, self.precision)
        self.attention = self.predictor.has_attention
        self.audio_frame_rate = float(self.encoders.audio.frame_rate)  # feature frames per second
        self.emotions = tuple(self.predictor.cfg.data.emotions)
        self.run_name = Path(settings.run).resolve().name
        self.load_seconds = time.perf_counter() - t0
        self.pool = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="taemi-extract"
        )
        self.batcher: MicroBatcher[ClipInput, Fused] = MicroBatcher(
            self.fuse,
            batch_size=settings.batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            name="taemi-fusion",
        ).start()
        self._lock = threading.Lock()
        self.in_flight = 0  # admitted requests not finished
        self.waiting = 0  # of which waiting for an extraction worker
        self.served = 0  # answered 200
        self.failed = 0  # answered with an error after admission
        self.rejected = 0  # refused with 503 (queue full)
        self._mean_seconds = 1.0  # running mean of request seconds (Retry-After)
        self.started = time.time()
        log.info(
            "taemi serve: run %s (%s weights, %s profile), fusion on %s %s, loaded in %.1f s",
            self.plan.run,
            settings.which,
            self.plan.profile,
            self.device,
            self.precision,
            self.load_seconds,
        )

    def close(self) -> None:
        self.batcher.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- admission -----------------------------------------------------------------

    def admit(self) -> None:
        """Take a place in the queue, or raise 503 (with ``Retry-After``) when it is full."""
        with self._lock:
            if self.in_flight >= self.settings.queue_size:
                self.rejected += 1
                retry = self.retry_after()
                raise ApiError(
                    503,
                    "queue_full",
                    f"the server is busy: {self.in_flight} requests in progress, its queue holds "
                    f"{self.settings.queue_size} (taemi serve --queue-size); retry in {retry} s",
                    headers={"Retry-After": str(retry)},
                )
            self.in_flight += 1

    def release(self, ok: bool, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            if ok:
                self.served += 1
            else:
                self.failed += 1
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the mean request time times the queue's
        length over the workers, within [1, 120]."""
        est = self._mean_seconds * self.in_flight / self.settings.workers
        return int(min(120, max(1, math.ceil(est))))

    # -- extraction (a pool thread) --------------------------------------------------------

    def submit_extraction(self, uploads: list[Upload], folder: Path):
        """Queue :meth:`extract_request` on the pool; returns its concurrent future."""
        with self._lock:
            self.waiting += 1
        return self.pool.submit(self._extract_job, uploads, folder, time.perf_counter())

    def _extract_job(self, uploads: list[Upload], folder: Path, submitted: float):
        with self._lock:
            self.waiting -= 1
        queued = time.perf_counter() - submitted
        out = self.extract_request(uploads, folder)
        out.timings["queue"] = queued
        return out

    def extract_request(self, uploads: list[Upload], folder: Path) -> ExtractedRequest:
        """Features of ``uploads`` (files in ``folder``) as the run's were extracted, read
        back as the run's dataset items; empty and undecodable files are failures."""
        from taemi.store import FeatureStore

        t0 = time.perf_counter()
        failures = [
            self.failure_record(u, 422, "empty_upload", "the upload is empty (0 bytes)")
            for u in uploads
            if u.size == 0
        ]
        todo = [u for u in uploads if u.size > 0]
        timings: dict[str, float] = {s: 0.0 for s in STAGES}
        clips: list[ClipInput] = []
        if todo:
            root = folder / "features"
            media: dict[str, ClipMedia] = {}
            summary = extract(
                [Source(u.clip_id, u.path) for u in todo],
                root,
                self.encoders,
                self.plan.opts,
                progress=False,
                clip_media=media,
            )
            timings.update(summary.stage_seconds)
            by_id = {u.clip_id: u for u in todo}
            failures += [
                self._extraction_failure(by_id[e["clip_id"]], e, folder)
                for e in _read_jsonl(root / ERRORS_FILE)
                if e.get("clip_id") in by_id
            ]
            done = [u for u in todo if u.clip_id in media]
            if done:
                store = FeatureStore(root)
                self.predictor.check_store(store)
                ds = self.predictor.dataset(store, ids=[u.clip_id for u in done])
                collate = ds.collator()
                for i, u in enumerate(done):
                    missing = store.missing[store.index(u.clip_id)]  # (3,) audio, vision, text
                    transcript = root / TRANSCRIPTS / f"{u.clip_id}.txt"
                    clips.append(
                        ClipInput(
                            upload=u,
                            item=ds[i],
                            collate=collate,
                            present={m: not bool(x) for m, x in zip(MODALITIES, missing)},
                            transcript=transcript.read_text(encoding="utf-8").strip()
                            if transcript.is_file()
                            else "",
                            media=media[u.clip_id],
                        )
                    )
            failed = {f["id"] for f in failures}
            failures += [  # neither extracted nor reported: never silently dropped
                self.failure_record(u, 500, "extraction_failed", "the extraction did not report it")
                for u in todo
                if u.clip_id not in media and u.clip_id not in failed
            ]
        timings["extract"] = time.perf_counter() - t0
        failures.sort(key=lambda f: f["index"])
        return ExtractedRequest(clips, failures, timings)

    @staticmethod
    def failure_record(u: Upload, status: int, code: str, message: str) -> dict[str, Any]:
        return {
            "id": u.clip_id,
            "index": u.index,
            "filename": u.filename,
            "status": status,
            "code": code,
            "error": f"{u.filename}: {message}",
        }

    def _extraction_failure(self, u: Upload, record: dict, folder: Path) -> dict[str, Any]:
        """A failure of the extraction's error report, with the server's paths replaced by
        the client's file name."""
        reason = str(record.get("reason") or "unknown error")
        for p in (str(u.path), str(folder)):
            reason = reason.replace(p, u.filename)
        stage = record.get("stage")
        if stage in ("input", "decode"):
            code = "no_usable_stream" if "no audio or video stream" in reason else "not_media"
            if reason.startswith(u.filename):
                reason = reason[len(u.filename) :].lstrip(": ")
            return self.failure_record(u, 422, code, f"cannot be read as media: {reason}")
        return self.failure_record(u, 500, "extraction_failed", f"{stage} failed: {reason}")

    # -- fusion (the batcher's thread) ---------------------------------------------------

    def fuse(self, clips: list[ClipInput]) -> list[Fused]:
        """The fusion model on ``clips`` (of any requests) as one batch."""
        pred, weights = self.predictor.predict_items(
            [c.item for c in clips], clips[0].collate, attention=self.attention
        )
        return [Fused(pred[i], {m: weights[m][i] for m in weights}) for i in range(len(clips))]

    def submit_fusion(self, clip: ClipInput):
        """Queue ``clip`` for the micro-batcher; returns its concurrent future (a Batched)."""
        return self.batcher.submit(clip)

    # -- responses ----------------------------------------------------------------------

    def clip_json(
        self, clip: ClipInput, out: Batched[Fused], timings: dict[str, float]
    ) -> dict[str, Any]:
        """One clip of the predict response (README, "Serving")."""
        raw = out.value.raw
        if not np.isfinite(raw).all():
            raise ApiError(
                500,
                "non_finite",
                f"{clip.upload.filename}: the model's predictions are NaN/Inf (its features "
                "hold NaN/Inf; the run's weights were checked finite)",
            )
        face = self.plan.face
        return {
            "id": clip.upload.clip_id,
            "filename": clip.upload.filename,
            "intensities": {e: float(v) for e, v in zip(self.emotions, np.clip(raw, 0.0, 1.0))},
            "raw": {e: float(v) for e, v in zip(self.emotions, raw)},
            "modalities": {
                m: {"present": clip.present[m], "reason": _missing_reason(m, clip.present, face)}
                for m in MODALITIES
            },
            "transcript": clip.transcript,
            "media_seconds": float(clip.media.media_seconds),
            "timings": {
                **timings,
                "fusion_wait": out.waited,
                "fusion": out.seconds,
            },
            "fusion_batch_size": out.batch_size,
            "attention": {
                m: self._attention_json(clip, m, out.value.attention.get(m))
                for m in ("audio", "vision")
            },
        }

    def _attention_json(
        self, clip: ClipInput, m: str, weights: np.ndarray | None
    ) -> dict[str, list[float]] | None:
        if not self.attention or weights is None or not clip.present[m]:
            return None
        n = len(weights)
        if m == "audio":
            times = np.arange(n, dtype=np.float64) / self.audio_frame_rate  # frame starts
        else:
            rows = clip.media.vision_times
            if rows is None or len(rows) < n:
                raise RuntimeError(
                    f"{clip.upload.filename}: {n} vision steps but "
                    f"{0 if rows is None else len(rows)} frame timestamps were recorded"
                )
            times = rows[:n]  # the model keeps the first max_vision_len rows
        return {
            "times": [round(float(t), 6) for t in times],
            "weights": [float(w) for w in weights],
        }

    def health(self) -> dict[str, Any]:
        with self._lock:
            counts = {
                "queue_length": self.in_flight,
                "waiting_for_extraction": self.waiting,
                "requests_served": self.served,
                "requests_failed": self.failed,
                "requests_rejected": self.rejected,
            }
        return {
            "status": "ok",
            "run": self.run_name,
            **counts,
            "queue_size": self.settings.queue_size,
            "workers": self.settings.workers,
            "fusion_batches": self.batcher.stats(),
            "uptime_seconds": round(time.time() - self.started, 3),
        }

    def model_info(self) -> dict[str, Any]:
        cfg = self.predictor.cfg
        features = self.plan.features
        if features is not None:
            feats = {
                "profile": self.plan.profile,
                "dims": features.get("dims"),
                "dtype": features.get("dtype"),
                "text_tokens": features.get("text_tokens"),
                "backbones": {
                    m: (features["modalities"][m] or {}).get("backbone") for m in MODALITIES
                },
            }
        else:
            feats = {
                "profile": self.plan.profile,
                "dims": {m: getattr(cfg.model, f"{m}_dim") for m in MODALITIES},
                "dtype": None,
                "text_tokens": None,
                "backbones": None,
            }
        feats["options"] = self.plan.options()
        metrics = read_metrics(self.settings.run)
        training = None
        if metrics is not None:
            valid = metrics.get("valid") or {}
            training = {
                "best_epoch": metrics.get("best_epoch"),
                "valid_mean_pearson": valid.get("mean_pearson"),
                "valid_pearson": valid.get("pearson"),
                "valid_mean_ccc": valid.get("mean_ccc"),
                "valid_clips": valid.get("n"),
                "train_on_all": metrics.get("train_on_all"),
                "epochs_run": metrics.get("epochs_run"),
            }
        return {
            "run": self.run_name,
            "weights": self.settings.which,
            "preset": cfg.preset,
            "mode": cfg.mode,
            "emotions": list(self.emotions),
            "model": asdict(cfg.model),
            "attention": self.attention,
            "features": feats,
            "audio_frame_rate": self.audio_frame_rate,
            "training": training,
            "device": str(self.device),
            "precision": self.precision,
            "provenance_differences": self.provenance_differences,
        }


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
