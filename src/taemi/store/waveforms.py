"""The waveform cache: decoded clip audio kept next to a feature store, for fine-tuning.

End-to-end fine-tuning (``taemi train --mode finetune``) feeds the audio backbone raw
audio every epoch: the first 12 s of 16 kHz mono audio (docs/method.md section 3, the
same samples extraction encodes). Decoding a compressed video again in every epoch would
cost more than the training step, so ``taemi extract ... --waveforms`` decodes each clip
once and keeps its samples here.

Layout::

    STORE/waveforms/
      manifest.json    {"format": "taemi-waveform-cache", "version": 1,
                        "sample_rate": 16000, "max_seconds": 12.0,
                        "dtype": "int16", "scale": 32767.0}
      {clip_id}.npy    (S,) little-endian int16 PCM, S <= round(max_seconds * sample_rate)
      *.tmp            a write in progress or left by an interrupted one (never read)

A sample ``x`` in [-1, 1] is stored as ``round(x * scale)`` and read back as
``q / scale``: the round trip is exact to ``0.5 / scale`` (1.5e-5). Louder samples are
clipped to [-1, 1] first, with a warning. 12 s of audio take 384 KB (a 17,000-clip
corpus about 6.5 GB, a quarter of its float16 features).

A clip without audio has no file: the feature store's audio missing flag says so. Every
write goes to a ``*.tmp`` file that is ``os.replace``-d onto ``{clip_id}.npy`` (atomic on
POSIX), so a crash leaves either the previous file or none, plus at most a ``*.tmp`` that
readers ignore and the next writer removes. ``verify`` finds files damaged otherwise
(a truncated copy, a wrong dtype).

A :class:`WaveformCache` sees the ids present when it was opened plus its own writes; it
holds no open files, so it pickles cheaply into DataLoader workers (root, settings, ids).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from taemi.store.clip import check_clip_id
from taemi.store.format import StoreError

logger = logging.getLogger(__name__)

__all__ = ["WAVEFORMS", "WaveformCache", "WaveformCacheError", "WaveformNotCached"]

#: Folder of the cache inside a feature store.
WAVEFORMS = "waveforms"
#: Value of the cache manifest's "format" field.
FORMAT_NAME = "taemi-waveform-cache"
#: The cache format version this module reads and writes.
FORMAT_VERSION = 1
#: Sample rate of every cached waveform (the audio backbones' rate; docs/method.md section 3).
SAMPLE_RATE = 16_000
#: int16 full scale: a float sample x is stored as round(x * SCALE).
SCALE = 32767.0
MANIFEST = "manifest.json"
_DTYPE = np.dtype("<i2")
_SUFFIX = ".npy"
_TMP_SUFFIX = ".tmp"
#: A *.tmp file older than this (seconds) is a leftover of an interrupted writer: one
#: write takes milliseconds, so an older one cannot belong to a write still running.
_STALE_TMP_SECONDS = 60.0


class WaveformCacheError(StoreError):
    """A problem with a waveform cache on disk; the message names the file and the fix."""


class WaveformNotCached(WaveformCacheError, KeyError):
    """A clip has no cached waveform (also a KeyError, as for a missing dict key)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _fix_hint(store: Path) -> str:
    return (
        f"run `taemi extract --input MEDIA --out {store} --waveforms` (clips already in the "
        "store are not encoded again: only their audio is decoded and cached)"
    )


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset in bytes) from an .npy header; ValueError/OSError if unreadable."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        return tuple(shape), np.dtype(dtype), fh.tell()


class WaveformCache:
    """Decoded audio of a feature store's clips, one int16 ``.npy`` file per clip.

    Args:
        root: the feature store folder; the cache is ``root/waveforms``.
        create: create the cache if it does not exist (``root`` must exist) and remove
            stale ``*.tmp`` leftovers; without it, a missing cache is an error.
        max_seconds: audio kept per clip; must equal the cache's setting. ``None`` (only
            with ``create=False``) accepts whatever the cache was written with.
        sample_rate: must equal the cache's rate (16 kHz in every cache taemi writes).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        create: bool = False,
        max_seconds: float | None = 12.0,
        *,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        self.store = Path(root)
        self.dir = self.store / WAVEFORMS
        if max_seconds is not None and not (np.isfinite(max_seconds) and max_seconds > 0):
            raise ValueError(f"max_seconds must be a positive number, got {max_seconds!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        manifest_path = self.dir / MANIFEST
        if create:
            if max_seconds is None:
                raise ValueError("creating a waveform cache needs max_seconds (got None)")
            if not self.store.is_dir():
                raise WaveformCacheError(
                    f"cannot create a waveform cache in {self.store}: not an existing folder"
                )
            self.dir.mkdir(exist_ok=True)
            if not manifest_path.exists():
                self._write_manifest(float(max_seconds), sample_rate)
        elif not manifest_path.is_file():
            raise WaveformCacheError(
                f"no waveform cache in {self.store} ({WAVEFORMS}/{MANIFEST} not found); "
                + _fix_hint(self.store)
            )
        manifest = self._read_manifest()
        if manifest["sample_rate"] != sample_rate or (
            max_seconds is not None and manifest["max_seconds"] != float(max_seconds)
        ):
            raise WaveformCacheError(
                f"{manifest_path}: the cache holds {manifest['max_seconds']} s per clip at "
                f"{manifest['sample_rate']} Hz, but {max_seconds} s at {sample_rate} Hz was asked "
                f"for; use the cache's settings, or delete {self.dir} and run taemi extract "
                "--waveforms again to rebuild it"
            )
        self.sample_rate: int = manifest["sample_rate"]
        self.max_seconds: float = manifest["max_seconds"]
        self.max_samples: int = round(self.max_seconds * self.sample_rate)
        self.scale: float = manifest["scale"]
        if create:
            self._remove_stale_tmp()
        self._ids: set[str] = {
            p.name[: -len(_SUFFIX)] for p in self.dir.iterdir() if p.name.endswith(_SUFFIX)
        }

    # -- manifest

    def _write_manifest(self, max_seconds: float, sample_rate: int) -> None:
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "sample_rate": sample_rate,
            "max_seconds": max_seconds,
            "dtype": "int16",
            "scale": SCALE,
        }
        tmp = self.dir / (MANIFEST + _TMP_SUFFIX)
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.dir / MANIFEST)
        logger.info(
            "created waveform cache %s (%s s per clip at %d Hz)", self.dir, max_seconds, sample_rate
        )

    def _read_manifest(self) -> dict[str, Any]:
        path = self.dir / MANIFEST
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WaveformCacheError(f"{path}: cannot read the cache manifest: {exc}") from exc
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise WaveformCacheError(f"{path}: not a taemi waveform cache manifest")
        if m.get("version") != FORMAT_VERSION:
            raise WaveformCacheError(
                f"{path}: waveform cache version {m.get('version')!r} is not supported "
                f"(this taemi reads version {FORMAT_VERSION})"
            )
        if m.get("dtype") != "int16" or m.get("scale") != SCALE:
            raise WaveformCacheError(
                f"{path}: dtype {m.get('dtype')!r} with scale {m.get('scale')!r} is not supported "
                f"(expected 'int16' with scale {SCALE})"
            )
        rate, seconds = m.get("sample_rate"), m.get("max_seconds")
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise WaveformCacheError(f"{path}: sample_rate {rate!r} is not a positive int")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise WaveformCacheError(f"{path}: max_seconds {seconds!r} is not a positive number")
        m["max_seconds"] = float(seconds)
        return m

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for p in self.dir.iterdir():
            if not p.name.endswith(_TMP_SUFFIX):
                continue
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    logger.warning(
                        "%s: removing %s left by an interrupted writer", self.dir, p.name
                    )
                    p.unlink()
            except FileNotFoundError:  # its writer just renamed or removed it
                pass

    # -- lookup

    def path(self, clip_id: str) -> Path:
        """File of ``clip_id`` (whether or not it exists)."""
        return self.dir / f"{check_clip_id(clip_id)}{_SUFFIX}"

    def __contains__(self, clip_id: object) -> bool:
        return isinstance(clip_id, str) and clip_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        """Cached clip ids, sorted."""
        return sorted(self._ids)

    def _existing(self, clip_id: str) -> Path:
        path = self.path(clip_id)
        if clip_id not in self._ids:
            raise WaveformNotCached(
                f"clip {clip_id!r} has no cached waveform in {self.dir} ({len(self._ids)} clips "
                "cached). A clip without audio has none (its audio missing flag is set in the "
                "feature store); otherwise " + _fix_hint(self.store)
            )
        return path

    def _damaged(self, path: Path, problem: str) -> WaveformCacheError:
        return WaveformCacheError(
            f"{path}: {problem}; delete the file and run `taemi extract --input MEDIA --out "
            f"{self.store} --waveforms` to cache it again"
        )

    def length(self, clip_id: str) -> int:
        """Number of samples of a cached clip, from the file header only (no data read)."""
        path = self._existing(clip_id)
        try:
            shape, dtype, _ = _read_header(path)
        except (OSError, ValueError) as exc:
            raise self._damaged(path, f"unreadable waveform file ({exc})") from exc
        if len(shape) != 1 or dtype != _DTYPE:
            raise self._damaged(path, f"holds a {dtype} array of shape {shape}, not (S,) int16")
        return int(shape[0])

    def get(self, clip_id: str) -> np.ndarray:
        """The cached waveform of ``clip_id``: (S,) float32 in [-1, 1], a fresh array."""
        path = self._existing(clip_id)
        try:
            pcm = np.load(path, mmap_mode="r", allow_pickle=False)  # (S,) int16 memmap
        except (OSError, ValueError, EOFError) as exc:
            raise self._damaged(path, f"unreadable waveform file ({exc})") from exc
        if pcm.ndim != 1 or pcm.dtype != _DTYPE or pcm.shape[0] == 0:
            raise self._damaged(
                path, f"holds a {pcm.dtype} array of shape {pcm.shape}, not (S,) int16"
            )
        out = np.multiply(pcm, np.float32(1.0 / self.scale), dtype=np.float32)  # (S,) float32
        del pcm  # closes the map
        return out

    # -- writing

    def put(self, clip_id: str, waveform: np.ndarray) -> int:
        """Cache one clip's audio, replacing any previous file; returns how many samples
        were outside [-1, 1] and clipped (a warning is logged when there are any).

        ``waveform``: (S,) float, finite, 1 <= S <= ``max_samples`` (crop before caching).
        """
        check_clip_id(clip_id)
        x = np.asarray(waveform)
        where = f"waveform of clip {clip_id!r}"
        if x.dtype.kind != "f":
            raise ValueError(f"{where} has dtype {x.dtype}; expected float samples in [-1, 1]")
        if x.ndim != 1:
            raise ValueError(f"{where} has shape {x.shape}; expected (S,) mono samples")
        if x.shape[0] == 0:
            raise ValueError(f"{where} is empty; a clip without audio gets no cache entry")
        if x.shape[0] > self.max_samples:
            raise ValueError(
                f"{where} has {x.shape[0]} samples, more than {self.max_samples} "
                f"({self.max_seconds} s at {self.sample_rate} Hz); crop it before caching"
            )
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise ValueError(f"{where} has {bad} NaN/Inf samples")
        clipped = int(np.count_nonzero(np.abs(x) > 1.0))
        if clipped:
            logger.warning(
                "%s: %d of %d samples outside [-1, 1] (peak %.3f) clipped before int16 conversion",
                where,
                clipped,
                x.shape[0],
                float(np.abs(x).max()),
            )
        pcm = np.round(np.clip(x, -1.0, 1.0) * self.scale).astype(_DTYPE)  # (S,) int16
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f"{clip_id}{_SUFFIX}.", suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, pcm, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / f"{clip_id}{_SUFFIX}")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._ids.add(clip_id)
        return clipped

    def discard(self, clip_id: str) -> None:
        """Remove a clip's cached waveform, if any (e.g. its audio turned out missing)."""
        self.path(clip_id).unlink(missing_ok=True)
        self._ids.discard(clip_id)

    # -- summaries

    def info(self) -> dict[str, Any]:
        """Plain values: path, n_clips, seconds (of cached audio), bytes, sample_rate,
        max_seconds; unreadable files count as 0 s (``verify`` names them)."""
        samples = nbytes = 0
        for cid in self._ids:
            try:
                samples += self.length(cid)
                nbytes += self.path(cid).stat().st_size
            except (WaveformCacheError, OSError):
                continue
        return {
            "path": str(self.dir),
            "n_clips": len(self._ids),
            "seconds": samples / self.sample_rate,
            "bytes": nbytes,
            "sample_rate": self.sample_rate,
            "max_seconds": self.max_seconds,
        }

    def verify(self) -> list[str]:
        """Problems of the cached files (an empty list means OK): unreadable or truncated
        files, a wrong dtype or shape, an empty or too long waveform, a file name that is
        not a valid clip id. Reads only headers and file sizes."""
        problems: list[str] = []
        for cid in sorted(self._ids):
            path = self.dir / f"{cid}{_SUFFIX}"
            try:
                check_clip_id(cid, source=str(path))
            except ValueError as exc:
                problems.append(f"{path}: {exc}")
                continue
            try:
                shape, dtype, offset = _read_header(path)
                size = path.stat().st_size
            except FileNotFoundError:
                problems.append(f"{path}: the file disappeared")
                continue
            except (OSError, ValueError) as exc:
                problems.append(f"{path}: unreadable waveform file ({exc})")
                continue
            if len(shape) != 1 or dtype != _DTYPE:
                problems.append(f"{path}: holds a {dtype} array of shape {shape}, not (S,) int16")
                continue
            n = shape[0]
            if size != offset + n * _DTYPE.itemsize:
                problems.append(
                    f"{path}: {size} bytes, but its header says {n} int16 samples "
                    f"({offset + n * _DTYPE.itemsize} bytes): truncated or damaged"
                )
            if n == 0:
                problems.append(f"{path}: empty waveform")
            elif n > self.max_samples:
                problems.append(
                    f"{path}: {n} samples, more than the cache's {self.max_samples} "
                    f"({self.max_seconds} s at {self.sample_rate} Hz)"
                )
        return problems

    def __repr__(self) -> str:
        return f"WaveformCache({str(self.store)!r}, {len(self)} clips, {self.max_seconds} s at {self.sample_rate} Hz)"
