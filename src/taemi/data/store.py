"""The feature store: on-disk home of extracted per-clip features (format v1).

Extraction writes one record per clip (spec ``TAEMI.md`` section 3: audio ``(T_a, D_a)``,
vision ``(T_v, D_v)``, text ``(D_t,)``, optional text token states ``(T_t, D_t)``, and a
missing flag per modality); training reads them back through memory maps, so a
paper-scale store (17,000 clips, about 30 GB in float16) is read with memory that does
not grow with the number of clips: only small per-clip index arrays live in RAM.

Layout::

    STORE/
      manifest.json        {"format": "taemi-feature-store", "version": 1,
                            "dtype": "float16" | "float32",
                            "dims": {"audio": D_a, "vision": D_v, "text": D_t},
                            "text_tokens": bool,
                            "modalities": {"audio": {"backbone": str, "settings": {...}},
                                           "vision": {...}, "text": {...}},
                            "shards": [{"name": "00000", "clips": n, "created": iso-time,
                                        "files": {"audio.bin": {"bytes": int, "sha256": hex},
                                                  ..., "index.npz": {...}}}, ...],
                            "taemi_version": str, "created": iso-time}
      shards/00000/audio.bin        all clips' audio rows, concatenated: (sum T_a, D_a)
      shards/00000/vision.bin       (sum T_v, D_v)
      shards/00000/text.bin         (n, D_t); a zero row for a clip whose text is missing
      shards/00000/text_tokens.bin  (sum T_t, D_t); only when the store has text tokens
      shards/00000/index.npz        ids (n,) unicode; audio_offset, audio_length,
                                    vision_offset, vision_length
                                    [, text_tokens_offset, text_tokens_length] (n,) int64
                                    in rows; missing (n, 3) bool (audio, vision, text).
                                    Saved and loaded with allow_pickle=False.
      .lock                         writer lock (fcntl.flock), present while a writer is
                                    open (a killed writer leaves it behind; harmless)
      waveforms/                    optional decoded audio for fine-tuning, written by
                                    ``taemi extract --waveforms`` (:mod:`taemi.data.waveforms`)

``*.bin`` files are raw little-endian float16 (or float32, chosen at creation), C order,
no header. A missing audio/vision/text-token sequence has length 0 (no rows) and its
missing flag set; a present sequence has at least one row. Clip ``k`` of a shard has
text row ``k``.

Atomicity. A writer streams the clips of a shard into ``shards/.tmp-<random>/``; to
commit, it fsyncs every file, renames the directory to ``shards/<5-digit number>``,
fsyncs ``shards/``, writes ``manifest.json.tmp``, fsyncs it, ``os.replace``-s it onto
``manifest.json`` and fsyncs the root (POSIX ``rename(2)`` is atomic). A clip is visible
only once the manifest lists its shard, so a crash at any point leaves the previous
manifest intact plus, at most, a tmp or unlisted shard directory; readers ignore those
and the next writer deletes them. To resume an interrupted extraction, open a writer on
the same store and skip ids for which ``clip_id in writer`` is true.

A clip added again with ``replace=True`` goes into a later shard; readers see only the
newest version (the later shard wins). Shards never hold the same id twice.

Commit policy. A writer commits its pending clips as one shard when ``commit_clips`` are
pending (default ``shard_size``, 256) and, with ``commit_seconds``, at the first
:meth:`StoreWriter.commit_if_due` (called by the writer's user after each batch) once that
many seconds have passed since its last commit; so a killed writer loses at most that
much finished work plus one batch. ``taemi extract`` commits every 32 clips or 10 s.
Frequent commits make small shards; with ``compact=True`` a writer merges runs of
adjacent shards smaller than ``shard_size`` into shards of at most ``shard_size`` clips
(:meth:`StoreWriter.compact`): while writing, a run as soon as it is full (no further
commit would fit, or it has 8 shards), so that a long run never has more than a few
small shards and each clip is rewritten about once, while its data are still in the page
cache; on a normal close, every run left (its own, or those a killed writer left). So
readers keep few files open.
Compaction is crash-safe the same way: the merged shard is written under ``.tmp-``,
fsynced and renamed to a new number, the manifest is replaced (listing it instead of the
small shards, at their place in the shard order, so which version of a clip wins and the
order of ``FeatureStore.ids`` do not change), and only then are the small shards
deleted. A crash at any point leaves a readable store whose unlisted directories the
next writer deletes. The source files are checked against their manifest checksums
while they are merged; a shard that fails is left as it is (with a warning), so that
compaction never hides damage from :func:`verify_store`. A reader opened before a
compaction may find a shard gone: it raises a StoreError asking to reopen the store.

Reading checks values. :meth:`FeatureStore.get` raises a StoreError naming the store, the
shard and the clip when a clip holds NaN or Inf (a damaged file: a writer never stores
one), so training fails at the first bad clip instead of after an epoch of NaN losses.

The writer lock uses ``fcntl`` and is POSIX only; reading works everywhere numpy does.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from taemi import MODALITIES, __version__
from taemi.data.clip import ClipFeatures, check_clip_id
from taemi.locking import acquire_lock, check_unlocked, release_lock

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FeatureStore",
    "StoreError",
    "StoreWriter",
    "check_writable",
    "format_info",
    "store_info",
    "verify_store",
]

#: Value of the manifest's "format" field.
FORMAT_NAME = "taemi-feature-store"
#: The store format version this module reads and writes.
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
SHARDS = "shards"
LOCK = ".lock"
INDEX = "index.npz"
#: What extraction writes beside the features (the one definition every reader and copier uses).
TRANSCRIPTS = "transcripts"  # STORE/transcripts/{id}.txt
ERRORS_FILE = "extract_errors.jsonl"  # one JSON line per clip that could not be processed
SUMMARY_FILE = "extract_summary.json"  # counts and seconds per stage of the last run
_TMP_PREFIX = ".tmp-"
_SHARD_NAME = re.compile(r"^\d{5,}$")
#: Store dtype name -> on-disk numpy dtype (always little-endian).
_DTYPES: dict[str, str] = {"float16": "<f2", "float32": "<f4"}
#: Files a writer may leave in a root without a manifest (a crash during creation).
_CREATION_LEFTOVERS = {LOCK, SHARDS, MANIFEST + ".tmp"}
#: Bytes read per step by verify_store (rounded down to whole rows).
_SCAN_CHUNK_BYTES = 8 << 20
#: How many memory maps a FeatureStore keeps open (each holds a file descriptor).
_MAX_OPEN_MAPS = 256
#: A writer with compact=True merges a run of small shards once it has this many.
_COMPACT_SHARDS = 8
#: Per file, how many clips with bad values verify_store names before summarising.
_MAX_NAMED_CLIPS = 10


def _held(root: Path, who: str) -> str:
    """The message when another process holds the store's writer lock."""
    return f"{root} is being written by another process{who}; lock {root / LOCK} is held"


class StoreError(Exception):
    """A problem with a feature store on disk; the message names the store, shard and file."""


class _ShardDamaged(Exception):
    """A shard's files do not match their manifest checksums (compaction leaves it alone)."""


# --------------------------------------------------------------------------- helpers


def _seq_modalities(text_tokens: bool) -> tuple[str, ...]:
    """Sequence-valued entries of a record: those stored as (offset, length) row ranges."""
    return ("audio", "vision", "text_tokens") if text_tokens else ("audio", "vision")


def _bin_files(text_tokens: bool) -> tuple[str, ...]:
    """Names of a shard's data files."""
    return tuple(f"{m}.bin" for m in (*_seq_modalities(text_tokens), "text"))


def _dim_of(name: str, dims: dict[str, int]) -> int:
    """Row width of a data entry (``text_tokens`` rows have the text dimension)."""
    return dims["text" if name == "text_tokens" else name]


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_finite(a: np.ndarray) -> bool:
    """True if ``a`` (store dtype, non-empty) holds no NaN/Inf. float16 is tested on its bits
    (all exponent bits set = Inf or NaN): ~10x faster than ``np.isfinite`` on float16."""
    if a.dtype == np.float16:
        return bool((a.view(np.uint16) & 0x7C00).max() < 0x7C00)
    return bool(np.isfinite(a).all())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_dims(dims: object) -> dict[str, int]:
    """Validate writer ``dims``: keys exactly the modalities, positive int values."""
    if not isinstance(dims, dict) or set(dims) != set(MODALITIES):
        keys = sorted(dims) if isinstance(dims, dict) else dims
        raise ValueError(f"dims must be a dict with keys exactly {list(MODALITIES)}, got {keys!r}")
    out: dict[str, int] = {}
    for m in MODALITIES:
        d = dims[m]
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) < 1:
            raise ValueError(f"dims[{m!r}] must be a positive int, got {d!r}")
        out[m] = int(d)
    return out


def _check_dtype(dtype: object) -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return str(dtype)


def _check_modalities(modalities: object) -> dict[str, dict[str, Any]]:
    """Validate and JSON-normalise backbone provenance ``{modality: {backbone, settings}}``."""
    if not isinstance(modalities, dict):
        raise TypeError(f"modalities must be a dict, got {type(modalities).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for m, entry in modalities.items():
        if m not in MODALITIES:
            raise ValueError(f"modalities has unknown modality {m!r}; known: {list(MODALITIES)}")
        if not isinstance(entry, dict) or not isinstance(entry.get("backbone"), str):
            raise TypeError(
                f"modalities[{m!r}] must be a dict with a str 'backbone' and a dict 'settings', "
                f"got {entry!r}"
            )
        extra = set(entry) - {"backbone", "settings"}
        if extra:
            raise ValueError(f"modalities[{m!r}] has unknown keys {sorted(extra)}")
        settings = entry.get("settings", {})
        if not isinstance(settings, dict):
            raise TypeError(f"modalities[{m!r}]['settings'] must be a dict, got {settings!r}")
        try:
            # Round trip so tuples become lists, exactly as they will read back.
            out[m] = json.loads(json.dumps({"backbone": entry["backbone"], "settings": settings}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"modalities[{m!r}] is not JSON-serialisable: {exc}") from exc
    return out


def _read_manifest(root: Path) -> dict[str, Any]:
    """Load and check ``root/manifest.json``; StoreError naming the problem otherwise."""
    path = root / MANIFEST
    if not path.is_file():
        raise StoreError(f"no feature store at {root}: {MANIFEST} not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: cannot read the manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(
            f"{path}: not a taemi feature store (format {found!r}, expected {FORMAT_NAME!r})"
        )
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version!r} is not supported "
            f"(this taemi {__version__} reads version {FORMAT_VERSION})"
        )
    if manifest.get("dtype") not in _DTYPES:
        raise StoreError(f"{path}: dtype {manifest.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    try:
        manifest["dims"] = _check_dims(manifest.get("dims"))
    except ValueError as exc:
        raise StoreError(f"{path}: {exc}") from exc
    if not isinstance(manifest.get("text_tokens"), bool):
        raise StoreError(
            f"{path}: 'text_tokens' must be true or false, got {manifest.get('text_tokens')!r}"
        )
    if not isinstance(manifest.get("modalities", {}), dict):
        raise StoreError(f"{path}: 'modalities' must be an object")
    manifest.setdefault("modalities", {})
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise StoreError(f"{path}: 'shards' must be a list, got {shards!r}")
    names: set[str] = set()
    for k, shard in enumerate(shards):
        ok = (
            isinstance(shard, dict)
            and isinstance(shard.get("name"), str)
            and _SHARD_NAME.match(shard["name"]) is not None
            and isinstance(shard.get("clips"), int)
            and shard["clips"] >= 1
            and isinstance(shard.get("files"), dict)
        )
        if not ok:
            raise StoreError(f"{path}: shard entry {k} is malformed: {shard!r}")
        if shard["name"] in names:
            raise StoreError(f"{path}: shard {shard['name']} is listed twice")
        names.add(shard["name"])
    return manifest


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Atomically replace ``root/manifest.json`` (tmp file, fsync, rename, fsync dir)."""
    tmp = root / (MANIFEST + ".tmp")
    data = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    _fsync_dir(root)


def _load_index(path: Path, text_tokens: bool) -> dict[str, np.ndarray]:
    """Load a shard's ``index.npz`` (no pickles) and check its arrays' types and shapes."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            index = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise StoreError(f"{path}: index file is missing") from exc
    except Exception as exc:  # a damaged zip raises many types (BadZipFile, ValueError, ...)
        raise StoreError(f"{path}: cannot read the index: {type(exc).__name__}: {exc}") from exc
    keys = ["ids", "missing"]
    for m in _seq_modalities(text_tokens):
        keys += [f"{m}_offset", f"{m}_length"]
    absent = [k for k in keys if k not in index]
    if absent:
        raise StoreError(f"{path}: index lacks arrays {absent} (has {sorted(index)})")
    ids = index["ids"]
    if ids.ndim != 1 or ids.dtype.kind != "U" or len(ids) == 0:
        raise StoreError(
            f"{path}: 'ids' must be a non-empty 1-D unicode array, got {ids.dtype} {ids.shape}"
        )
    n = len(ids)
    if index["missing"].shape != (n, 3) or index["missing"].dtype != np.bool_:
        raise StoreError(
            f"{path}: 'missing' must be bool ({n}, 3), got {index['missing'].dtype} {index['missing'].shape}"
        )
    for k in keys[2:]:
        a = index[k]
        if a.shape != (n,) or a.dtype.kind not in "iu":
            raise StoreError(f"{path}: {k!r} must be integer ({n},), got {a.dtype} {a.shape}")
        index[k] = a.astype(np.int64)
    return index


def _index_problems(
    where: str,
    index: dict[str, np.ndarray],
    dims: dict[str, int],
    text_tokens: bool,
    itemsize: int,
    sizes: dict[str, int | None],
) -> list[str]:
    """Consistency problems of one shard's index against itself and its files' sizes.

    ``sizes`` maps each data file name to its size on disk in bytes (None: file absent).
    Checked: offsets contiguous from 0, missing flag <=> length 0 (text: token length 0),
    ids valid and unique, each file's size equal to rows * D * itemsize.
    """
    problems: list[str] = []
    ids = index["ids"].tolist()
    n = len(ids)
    for cid in ids:
        try:
            check_clip_id(cid)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if len(set(ids)) != n:
        dups = sorted(c for c, k in Counter(ids).items() if k > 1)
        problems.append(f"{where}: duplicate clip ids within the shard: {dups[:_MAX_NAMED_CLIPS]}")
    missing = index["missing"]
    rows: dict[str, int] = {"text": n}
    for m in _seq_modalities(text_tokens):
        off, length = index[f"{m}_offset"], index[f"{m}_length"]
        if (length < 0).any():
            k = int(np.flatnonzero(length < 0)[0])
            problems.append(f"{where}: clip {ids[k]!r} has negative {m} length {int(length[k])}")
        starts = np.concatenate([[0], np.cumsum(length)[:-1]])
        if not np.array_equal(off, starts):
            k = int(np.flatnonzero(off != starts)[0])
            problems.append(
                f"{where}: {m} offsets are not contiguous: clip {ids[k]!r} starts at row "
                f"{int(off[k])}, expected {int(starts[k])}"
            )
        flag = missing[:, 2] if m == "text_tokens" else missing[:, MODALITIES.index(m)]
        bad = np.flatnonzero(flag != (length == 0))
        if len(bad):
            k = int(bad[0])
            problems.append(
                f"{where}: clip {ids[k]!r} has {m} length {int(length[k])} but its missing flag "
                f"is {bool(flag[k])} ({len(bad)} such clips); a missing sequence has length 0, "
                "a present one >= 1"
            )
        rows[m] = int(length.sum())
    for m, r in rows.items():
        name = f"{m}.bin"
        expected = r * _dim_of(m, dims) * itemsize
        size = sizes.get(name)
        if size is None:
            problems.append(f"{where}: {name} is missing")
        elif size != expected:
            problems.append(
                f"{where}: {name} has {size} bytes, the index expects {expected} "
                f"({r} rows x {_dim_of(m, dims)} x {itemsize} bytes)"
            )
    return problems


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- writer


class _PendingShard:
    """Clips of the shard being written, streamed into ``shards/.tmp-<random>/``.

    Each clip's rows are appended to the data files as it is added, so the writer's memory
    holds one clip, not a shard. sha256 digests are computed while writing.
    """

    def __init__(
        self, shards_dir: Path, text_tokens: bool, dims: dict[str, int], dtype: np.dtype
    ) -> None:
        self.dir: Path | None = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=shards_dir))
        self.text_tokens = text_tokens
        self.dims = dims
        self.dtype = dtype
        # Kept open across add() calls; finish() or abort() closes them.
        self.files = {name: open(self.dir / name, "wb") for name in _bin_files(text_tokens)}  # noqa: SIM115
        self.hashes = {name: hashlib.sha256() for name in self.files}
        self.ids: list[str] = []
        self.missing: list[tuple[bool, bool, bool]] = []
        self.lengths: dict[str, list[int]] = {m: [] for m in _seq_modalities(text_tokens)}

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, clip_id: str, arrays: dict[str, np.ndarray | None]) -> None:
        """Append one validated clip; on any error the files roll back to the previous clip."""
        saved = {name: (f.tell(), self.hashes[name].copy()) for name, f in self.files.items()}
        try:
            for m in _seq_modalities(self.text_tokens):
                a = arrays[m]
                if a is not None:
                    self._write(f"{m}.bin", a)
            text = arrays["text"]
            if text is None:  # a zero row keeps text row k == clip k
                text = np.zeros(self.dims["text"], dtype=self.dtype)
            self._write("text.bin", text)
        except BaseException:
            for name, (pos, digest) in saved.items():
                self.files[name].seek(pos)
                self.files[name].truncate()
                self.hashes[name] = digest
            raise
        self.ids.append(clip_id)
        self.missing.append(
            (arrays["audio"] is None, arrays["vision"] is None, arrays["text"] is None)
        )
        for m in self.lengths:
            a = arrays[m]
            self.lengths[m].append(0 if a is None else a.shape[0])

    def _write(self, name: str, a: np.ndarray) -> None:
        data = memoryview(a).cast("B")  # a is C-contiguous in the store dtype
        self.files[name].write(data)
        self.hashes[name].update(data)

    def finish(self) -> dict[str, dict[str, Any]]:
        """fsync and close the data files, write ``index.npz``; return the manifest file entries."""
        assert self.dir is not None
        files: dict[str, dict[str, Any]] = {}
        for name, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            files[name] = {"bytes": f.tell(), "sha256": self.hashes[name].hexdigest()}
            f.close()
        index: dict[str, np.ndarray] = {
            "ids": np.array(self.ids, dtype=str),  # (n,) unicode
            "missing": np.array(self.missing, dtype=bool).reshape(-1, 3),  # (n, 3)
        }
        for m, lengths in self.lengths.items():
            length = np.array(lengths, dtype=np.int64)  # (n,)
            index[f"{m}_length"] = length
            index[f"{m}_offset"] = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
        buf = io.BytesIO()
        np.savez(buf, **index)
        data = buf.getvalue()
        with open(self.dir / INDEX, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        files[INDEX] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _fsync_dir(self.dir)
        return files

    def abort(self) -> None:
        """Close files and delete the tmp directory (if it was not renamed already)."""
        for f in self.files.values():
            if not f.closed:
                f.close()
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


class StoreWriter:
    """Append clips to a feature store, creating it if needed; one writer per store at a time.

    Args:
        root: store directory. Created (with parents) if it does not exist.
        dims: ``{"audio": D_a, "vision": D_v, "text": D_t}``; required to create a store,
            checked against the manifest when opening one.
        dtype: ``"float16"`` or ``"float32"``; ``None`` means the store's dtype
            (``"float16"`` for a new store).
        text_tokens: whether clips carry text token states; ``None`` means the store's
            setting (False for a new store).
        modalities: backbone provenance ``{modality: {"backbone": str, "settings": {...}}}``,
            recorded at creation; opening a store with a different value is a StoreError.
        shard_size: the most clips a shard holds (the default ``commit_clips``);
            :meth:`compact` merges small shards up to this size.
        commit_clips: commit when this many clips are pending (<= ``shard_size``; default
            ``shard_size``).
        commit_seconds: :meth:`commit_if_due` also commits once this many seconds have
            passed since the last commit (callers call it after each burst of adds, e.g.
            a batch); ``None`` (default): by count only. :meth:`add` commits by count only,
            so that a burst is not cut into small shards.
        compact: merge runs of adjacent shards smaller than ``shard_size``
            (:meth:`compact`): a full run right after the commit that fills it, every run
            on a normal :meth:`close`; for writers that commit often.

    Use as a context manager: on exit, even when an exception propagates, the clips
    already added are committed (each is complete) and the lock is released; compaction
    runs only when no exception propagates (an interrupted run should end quickly; the
    next writer with ``compact=True`` merges what it left).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        dims: dict[str, int] | None = None,
        dtype: str | None = None,
        text_tokens: bool | None = None,
        modalities: dict[str, dict[str, Any]] | None = None,
        shard_size: int = 256,
        commit_clips: int | None = None,
        commit_seconds: float | None = None,
        compact: bool = False,
    ) -> None:
        self.root = Path(root)
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        self.shard_size = shard_size
        commit_clips = shard_size if commit_clips is None else commit_clips
        if (
            isinstance(commit_clips, bool)
            or not isinstance(commit_clips, int)
            or not 1 <= commit_clips <= shard_size
        ):
            raise ValueError(
                f"commit_clips must be an int in [1, shard_size={shard_size}], got {commit_clips!r}"
            )
        self.commit_clips = commit_clips
        if commit_seconds is not None and not (
            isinstance(commit_seconds, (int, float))
            and not isinstance(commit_seconds, bool)
            and np.isfinite(commit_seconds)
            and commit_seconds > 0
        ):
            raise ValueError(
                f"commit_seconds must be a positive number or None, got {commit_seconds!r}"
            )
        self.commit_seconds = None if commit_seconds is None else float(commit_seconds)
        self.compacting = bool(compact)
        self._last_commit = time.monotonic()
        dims = None if dims is None else _check_dims(dims)
        dtype = None if dtype is None else _check_dtype(dtype)
        if text_tokens is not None and not isinstance(text_tokens, bool):
            raise ValueError(f"text_tokens must be a bool, got {text_tokens!r}")
        modalities = None if modalities is None else _check_modalities(modalities)
        self._pending: _PendingShard | None = None
        self._lock_fd: int | None = None
        self._closed = True

        if not (self.root / MANIFEST).exists():
            self._check_creatable(dims)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_lock(self.root / LOCK, StoreError, functools.partial(_held, self.root))
        self._closed = False
        try:
            if (self.root / MANIFEST).exists():
                self._manifest = _read_manifest(self.root)
                self._check_matches(dims, dtype, text_tokens, modalities)
            else:
                self._check_creatable(dims)
                assert dims is not None
                self._manifest = {
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "dtype": dtype or "float16",
                    "dims": dims,
                    "text_tokens": bool(text_tokens),
                    "modalities": modalities or {},
                    "shards": [],
                    "taemi_version": __version__,
                    "created": _now(),
                }
                (self.root / SHARDS).mkdir(exist_ok=True)
                _write_manifest(self.root, self._manifest)
                logger.info("created feature store %s (%s, dims %s)", self.root, self.dtype, dims)
            self._remove_leftovers()
            self._committed: set[str] = set(FeatureStore(self.root).ids)
        except BaseException:
            self._release()
            raise

    # -- properties

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._manifest["dims"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self._manifest["dtype"]])

    @property
    def text_tokens(self) -> bool:
        return bool(self._manifest["text_tokens"])

    @property
    def n_committed(self) -> int:
        """Number of distinct clips committed (visible to readers), this writer's included."""
        return len(self._committed)

    @property
    def n_pending(self) -> int:
        """Clips added but not yet committed."""
        return 0 if self._pending is None else len(self._pending)

    # -- opening

    def _check_creatable(self, dims: dict[str, int] | None) -> None:
        if self.root.exists():
            if not self.root.is_dir():
                raise StoreError(
                    f"cannot create a feature store at {self.root}: it is not a directory"
                )
            others = sorted(
                p.name for p in self.root.iterdir() if p.name not in _CREATION_LEFTOVERS
            )
            if others:
                raise StoreError(
                    f"cannot create a feature store at {self.root}: the directory has no "
                    f"{MANIFEST} and is not empty (has {others[:5]})"
                )
        if dims is None:
            raise StoreError(
                f"no feature store at {self.root} ({MANIFEST} not found); pass dims= to create one"
            )

    def _check_matches(
        self,
        dims: dict[str, int] | None,
        dtype: str | None,
        text_tokens: bool | None,
        modalities: dict[str, dict[str, Any]] | None,
    ) -> None:
        m = self._manifest
        where = self.root / MANIFEST
        if dims is not None and dims != m["dims"]:
            raise StoreError(f"{where}: store has dims {m['dims']}, the writer was given {dims}")
        if dtype is not None and dtype != m["dtype"]:
            raise StoreError(f"{where}: store has dtype {m['dtype']}, the writer was given {dtype}")
        if text_tokens is not None and text_tokens != m["text_tokens"]:
            raise StoreError(
                f"{where}: store has text_tokens={m['text_tokens']}, the writer was given {text_tokens}"
            )
        if modalities is not None and modalities != m["modalities"]:
            raise StoreError(
                f"{where}: store features come from {m['modalities']}, the writer was given "
                f"{modalities}; features of different backbones/settings must not be mixed "
                "(write to a new store)"
            )

    def _remove_leftovers(self) -> None:
        """Delete what a crashed writer left: tmp shard dirs, unlisted shard dirs, manifest tmp."""
        listed = {s["name"] for s in self._manifest["shards"]}
        tmp_manifest = self.root / (MANIFEST + ".tmp")
        if tmp_manifest.exists():
            logger.warning(
                "%s: removing leftover %s of an interrupted writer", self.root, tmp_manifest.name
            )
            tmp_manifest.unlink()
        shards = self.root / SHARDS
        shards.mkdir(exist_ok=True)
        for p in sorted(shards.iterdir()):
            if p.name in listed:
                continue
            if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or _SHARD_NAME.match(p.name)):
                logger.warning(
                    "%s: removing %s left by an interrupted writer (not in the manifest)",
                    self.root,
                    p,
                )
                shutil.rmtree(p)
            else:
                logger.warning(
                    "%s: unexpected entry %s is not part of the store; left in place", self.root, p
                )

    # -- writing

    def __contains__(self, clip_id: object) -> bool:
        """True if ``clip_id`` is committed or pending in this writer."""
        if not isinstance(clip_id, str):
            return False
        return clip_id in self._committed or (
            self._pending is not None and clip_id in self._pending.ids
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"StoreWriter for {self.root} is closed")

    def _convert(self, clip_id: str, name: str, value: object, ndim: int) -> np.ndarray:
        """Check one array (rank, finiteness, dtype range) and return it C-contiguous in the store dtype."""
        a = np.asarray(value)
        if a.dtype.kind not in "fiu":
            raise ValueError(f"clip {clip_id!r}: {name} has dtype {a.dtype}; expected real numbers")
        d = _dim_of(name, self._manifest["dims"])
        want = "(T, D)" if ndim == 2 else "(D,)"
        if a.ndim != ndim or a.shape[-1] != d:
            raise ValueError(
                f"clip {clip_id!r}: {name} has shape {a.shape}, expected {want} with D = {d}"
            )
        if ndim == 2 and a.shape[0] < 1:
            raise ValueError(
                f"clip {clip_id!r}: {name} has 0 rows; a modality with no data must be None (missing)"
            )
        finite = np.isfinite(a)
        if not finite.all():
            raise ValueError(f"clip {clip_id!r}: {name} has {int((~finite).sum())} NaN/Inf values")
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(a, dtype=self.dtype)
        if not np.isfinite(out).all():
            raise ValueError(
                f"clip {clip_id!r}: {name} has values outside the {self._manifest['dtype']} range "
                f"(max |x| = {float(np.abs(a).max()):g}, largest representable "
                f"{float(np.finfo(self.dtype).max):g}); rescale, or create the store with dtype='float32'"
            )
        return out

    def add(self, clip: ClipFeatures, *, replace: bool = False) -> None:
        """Validate ``clip``, convert it to the store dtype and append it to the pending shard.

        Raises ValueError (naming the clip id and modality) for a bad id, wrong shapes or
        dims, a zero-row sequence, NaN/Inf or values out of the dtype's range, text tokens
        given or absent against the store's setting, or an id already in the store unless
        ``replace=True`` (the new version then supersedes the old one for readers).
        """
        self._check_open()
        cid, arrays = self._arrays(clip)
        pending = self._pending is not None and cid in self._pending.ids
        if (pending or cid in self._committed) and not replace:
            raise ValueError(
                f"clip {cid!r} is already in the store {self.root} "
                f"({'pending' if pending else 'committed'}); pass replace=True to supersede it"
            )
        if pending:
            self.flush()  # the new version must land in a later shard than the old one
        if self._pending is None:
            self._pending = _PendingShard(
                self.root / SHARDS, self.text_tokens, self._manifest["dims"], self.dtype
            )
        self._pending.append(cid, arrays)
        if len(self._pending) >= self.commit_clips:
            self.flush()
            self._compact_full_runs()

    def check(self, clip: ClipFeatures) -> None:
        """Raise the ValueError :meth:`add` would raise for ``clip``'s values (id, shapes,
        dims, NaN/Inf, dtype range, text tokens), writing nothing. Lets a caller validate
        a clip before writing what goes with it (a transcript) and then adding it."""
        self._check_open()
        self._arrays(clip)

    def _arrays(self, clip: ClipFeatures) -> tuple[str, dict[str, np.ndarray | None]]:
        """``(clip id, arrays)`` of a valid clip, converted to the store dtype; ValueError if invalid."""
        if not isinstance(clip, ClipFeatures):
            raise TypeError(f"add() takes a ClipFeatures, got {type(clip).__name__}")
        cid = check_clip_id(clip.clip_id)
        arrays: dict[str, np.ndarray | None] = {}
        for m in ("audio", "vision"):
            v = getattr(clip, m)
            arrays[m] = None if v is None else self._convert(cid, m, v, ndim=2)
        arrays["text"] = (
            None if clip.text is None else self._convert(cid, "text", clip.text, ndim=1)
        )
        if self.text_tokens:
            if clip.text is None and clip.text_tokens is not None:
                raise ValueError(f"clip {cid!r}: text is missing but text_tokens are given")
            if clip.text is not None and clip.text_tokens is None:
                raise ValueError(
                    f"clip {cid!r}: the store {self.root} keeps text token states but the clip has none"
                )
            v = clip.text_tokens
            arrays["text_tokens"] = (
                None if v is None else self._convert(cid, "text_tokens", v, ndim=2)
            )
        elif clip.text_tokens is not None:
            raise ValueError(
                f"clip {cid!r}: has text_tokens but the store {self.root} was created with text_tokens=False"
            )
        return cid, arrays

    def _due_by_time(self) -> bool:
        return (
            self.commit_seconds is not None
            and time.monotonic() - self._last_commit >= self.commit_seconds
        )

    def commit_if_due(self) -> bool:
        """Commit the pending clips if the commit policy says so (``commit_clips`` pending,
        or ``commit_seconds`` passed since the last commit); True if it committed. Callers
        that add clips in bursts call it after each burst."""
        self._check_open()
        if self.n_pending and (self.n_pending >= self.commit_clips or self._due_by_time()):
            self.flush()
            self._compact_full_runs()
            return True
        return False

    def _compact_full_runs(self) -> None:
        """With ``compact=True``: merge the runs of small shards that are full (see the
        module docstring), so that small shards do not pile up during a long run."""
        if not self.compacting:
            return
        full = [
            g
            for g in self.compaction_groups()
            if len(g) >= _COMPACT_SHARDS
            or self._group_clips(g) > self.shard_size - self.commit_clips
        ]
        if full:
            self._compact(full)

    def _group_clips(self, group: list[str]) -> int:
        return sum(int(s["clips"]) for s in self._manifest["shards"] if s["name"] in group)

    def flush(self) -> None:
        """Commit the pending clips as one shard (no-op if none are pending)."""
        self._check_open()
        if self._pending is None or len(self._pending) == 0:
            return
        pending, self._pending = self._pending, None
        try:
            self._commit(pending)
        except Exception as exc:
            pending.abort()
            raise StoreError(
                f"{self.root}: committing a shard of {len(pending)} clips failed "
                f"({type(exc).__name__}: {exc}); those clips are not in the store"
            ) from exc
        except BaseException:
            pending.abort()
            raise

    def _commit(self, pending: _PendingShard) -> None:
        files = pending.finish()
        shards_dir = self.root / SHARDS
        name = self._new_shard_name()
        assert pending.dir is not None
        os.rename(pending.dir, shards_dir / name)
        pending.dir = None
        _fsync_dir(shards_dir)
        manifest = copy.deepcopy(self._manifest)
        manifest["shards"].append(
            {"name": name, "clips": len(pending), "created": _now(), "files": files}
        )
        _write_manifest(self.root, manifest)
        self._manifest = manifest
        self._committed.update(pending.ids)
        self._last_commit = time.monotonic()
        logger.info("%s: committed shard %s (%d clips)", self.root, name, len(pending))

    def _new_shard_name(self) -> str:
        shards_dir = self.root / SHARDS
        numbers = [int(s["name"]) for s in self._manifest["shards"]]
        k = max(numbers) + 1 if numbers else 0
        while (shards_dir / f"{k:05d}").exists():
            k += 1
        return f"{k:05d}"

    # -- compaction

    def compaction_groups(self) -> list[list[str]]:
        """Names of the shards :meth:`compact` would merge, one list per merged shard: runs
        of adjacent shards (in manifest order) each holding fewer than ``shard_size`` clips,
        cut greedily so that each group holds at most ``shard_size`` clips; groups of one
        shard are left alone."""
        groups: list[list[str]] = []
        group: list[str] = []
        total = 0
        for shard in self._manifest["shards"]:
            n = int(shard["clips"])
            small = n < self.shard_size
            if not small or total + n > self.shard_size:
                if len(group) > 1:
                    groups.append(group)
                group, total = [], 0
            if small:
                group.append(shard["name"])
                total += n
        if len(group) > 1:
            groups.append(group)
        return groups

    def compact(self) -> int:
        """Commit pending clips, then merge small adjacent shards (:meth:`compaction_groups`)
        into one shard per group, crash-safely (module docstring). Returns the number of
        shards removed. A group whose files fail their checksums is left as it is, with a
        warning."""
        self._check_open()
        self.flush()
        return self._compact(self.compaction_groups())

    def _compact(self, groups: list[list[str]]) -> int:
        removed = 0
        for group in groups:
            try:
                self._merge_shards(group)
            except _ShardDamaged as exc:
                logger.warning("%s: shards %s not compacted: %s (run `taemi store verify %s`)",
                               self.root, ", ".join(group), exc, self.root)  # fmt: skip
                continue
            except OSError as exc:  # e.g. a full disk: the store is as it was; stop trying
                logger.warning("%s: compaction stopped, shards %s stay as they are: %s",
                               self.root, ", ".join(group), exc)  # fmt: skip
                break
            removed += len(group) - 1
        return removed

    def _merge_shards(self, group: list[str]) -> None:
        """Replace the listed shards ``group`` (adjacent in the manifest) by one shard."""
        entries = [s for s in self._manifest["shards"] if s["name"] in group]
        tokens = self.text_tokens
        seqs = _seq_modalities(tokens)
        dims = self._manifest["dims"]
        # newest occurrence of each id within the group, in order of newest occurrence
        where: dict[str, tuple[int, int]] = {}
        sources: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        for k, entry in enumerate(entries):
            sdir = self.root / SHARDS / entry["name"]
            for fname in (*_bin_files(tokens), INDEX):
                recorded = entry["files"].get(fname)
                try:
                    digest, _, _ = _scan_file(sdir / fname, 0, self.dtype, lambda n: None)
                except OSError as exc:
                    raise _ShardDamaged(f"shard {entry['name']}: {fname}: {exc}") from exc
                if not isinstance(recorded, dict) or recorded.get("sha256") != digest:
                    raise _ShardDamaged(
                        f"shard {entry['name']}: {fname} does not match its checksum"
                    )
            index = _load_index(sdir / INDEX, tokens)
            maps = {
                name: np.memmap(sdir / f"{name}.bin", dtype=self.dtype, mode="r",
                                shape=(rows, _dim_of(name, dims)))
                for name, rows in ({m: int(index[f"{m}_length"].sum()) for m in seqs}
                                   | {"text": len(index["ids"])}).items()
                if rows > 0
            }  # fmt: skip
            sources.append((index, maps))
            for r, cid in enumerate(index["ids"].tolist()):
                where.pop(cid, None)
                where[cid] = (k, r)
        merged = _PendingShard(self.root / SHARDS, tokens, dims, self.dtype)
        try:
            for cid, (k, r) in where.items():
                index, maps = sources[k]
                missing = index["missing"][r]  # (3,) audio, vision, text
                arrays: dict[str, np.ndarray | None] = {}
                for m in seqs:
                    off, length = int(index[f"{m}_offset"][r]), int(index[f"{m}_length"][r])
                    arrays[m] = maps[m][off : off + length] if length else None  # (T, D) view
                arrays["text"] = None if missing[2] else maps["text"][r]  # (D_t,)
                merged.append(cid, arrays)
            files = merged.finish()
            name = self._new_shard_name()
            assert merged.dir is not None
            os.rename(merged.dir, self.root / SHARDS / name)
            merged.dir = None
            _fsync_dir(self.root / SHARDS)
        except BaseException:
            merged.abort()
            raise
        finally:
            sources.clear()  # drop the memory maps
        manifest = copy.deepcopy(self._manifest)
        at = next(i for i, s in enumerate(manifest["shards"]) if s["name"] in group)
        entry = {"name": name, "clips": len(where), "created": _now(), "files": files}
        manifest["shards"] = [s for s in manifest["shards"] if s["name"] not in group]
        manifest["shards"].insert(at, entry)
        _write_manifest(self.root, manifest)
        self._manifest = manifest
        for old in group:  # unlisted now; a crash here leaves them to the next writer
            shutil.rmtree(self.root / SHARDS / old, ignore_errors=True)
        _fsync_dir(self.root / SHARDS)
        logger.info("%s: compacted shards %s into shard %s (%d clips)",
                    self.root, ", ".join(group), name, len(where))  # fmt: skip

    def close(self) -> None:
        """Commit pending clips, compact (with ``compact=True``) and release the lock;
        calling it again does nothing."""
        self._close(compact=self.compacting)

    def _close(self, *, compact: bool) -> None:
        if self._closed:
            return
        try:
            self.flush()
            if compact:
                self.compact()
        finally:
            self._release()

    def _release(self) -> None:
        if self._pending is not None:
            self._pending.abort()
            self._pending = None
        if self._lock_fd is not None:
            release_lock(self.root / LOCK, self._lock_fd)
            self._lock_fd = None
        self._closed = True

    def __enter__(self) -> StoreWriter:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(compact=self.compacting and exc_type is None)

    def __repr__(self) -> str:
        state = (
            "closed" if self._closed else f"{self.n_committed} committed, {self.n_pending} pending"
        )
        return f"StoreWriter({str(self.root)!r}, {state})"


def check_writable(root: str | os.PathLike[str]) -> None:
    """Raise StoreError if a :class:`StoreWriter` certainly cannot open ``root``: a path that
    is not a directory, a non-empty directory without a manifest, an unreadable manifest or
    another format or version, or a store locked by another writer. Creates and changes
    nothing (callers check before loading models or writing reports into ``root``). Dims
    and provenance are checked when the writer opens."""
    root = Path(root)
    if not root.exists():
        return
    if not root.is_dir():
        raise StoreError(f"cannot write a feature store at {root}: it is not a directory")
    if not (root / MANIFEST).exists():
        others = sorted(p.name for p in root.iterdir() if p.name not in _CREATION_LEFTOVERS)
        if others:
            raise StoreError(
                f"cannot create a feature store at {root}: the directory has no {MANIFEST} "
                f"and is not empty (has {others[:5]})"
            )
        return
    _read_manifest(root)
    check_unlocked(root / LOCK, StoreError, functools.partial(_held, root))


# --------------------------------------------------------------------------- reader


class FeatureStore:
    """Read-only view of a feature store, memory-mapped.

    ``ids`` lists the visible clips in stable order (shard order, then row order); a clip
    superseded with ``replace=True`` appears once, at its newest position. ``get`` returns
    read-only ``np.memmap`` views in the store dtype (no copy, no conversion); a missing
    modality is ``None``.

    Memory maps open lazily and are not pickled: a pickled store (e.g. sent to torch
    DataLoader workers) carries only its root and index and reopens maps in the child.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.manifest: dict[str, Any] = _read_manifest(self.root)
        self.dims: dict[str, int] = dict(self.manifest["dims"])
        self.dtype: np.dtype = np.dtype(_DTYPES[self.manifest["dtype"]])
        self.has_text_tokens: bool = bool(self.manifest["text_tokens"])
        self._shard_names: list[str] = [s["name"] for s in self.manifest["shards"]]
        self._shard_rows: list[dict[str, int]] = []  # per shard: rows of each data file

        # Newest occurrence of each id wins; dict order = order of newest occurrences.
        where: dict[str, tuple[int, int]] = {}
        per_shard: list[dict[str, np.ndarray]] = []
        seqs = _seq_modalities(self.has_text_tokens)
        itemsize = self.dtype.itemsize
        for s, shard in enumerate(self.manifest["shards"]):
            sdir = self.root / SHARDS / shard["name"]
            label = f"{self.root}: shard {shard['name']}"
            if not sdir.is_dir():
                raise StoreError(f"{label}: directory {sdir} is missing")
            index = _load_index(sdir / INDEX, self.has_text_tokens)
            sizes = {name: _file_size(sdir / name) for name in _bin_files(self.has_text_tokens)}
            problems = _index_problems(
                label, index, self.dims, self.has_text_tokens, itemsize, sizes
            )
            if len(index["ids"]) != shard["clips"]:
                problems.append(
                    f"{label}: index has {len(index['ids'])} clips, the manifest says {shard['clips']}"
                )
            if problems:
                raise StoreError("; ".join(problems) + " (verify_store lists every problem)")
            self._shard_rows.append(
                {m: int(index[f"{m}_length"].sum()) for m in seqs} | {"text": len(index["ids"])}
            )
            per_shard.append(index)
            for r, cid in enumerate(index["ids"].tolist()):
                where.pop(cid, None)
                where[cid] = (s, r)

        n = len(where)
        self.ids: list[str] = list(where)
        self._pos: dict[str, int] = {cid: i for i, cid in enumerate(self.ids)}
        loc = np.array(list(where.values()), dtype=np.int64).reshape(n, 2)  # (N, 2): shard, row
        self._shard = loc[:, 0].astype(np.int32)  # (N,)
        self._row = loc[:, 1]  # (N,)
        self._offset: dict[str, np.ndarray] = {}
        self.lengths: dict[str, np.ndarray] = {}
        self.missing: np.ndarray = np.zeros((n, 3), dtype=bool)  # (N, 3) audio, vision, text
        for m in seqs:
            self._offset[m] = np.zeros(n, dtype=np.int64)
            self.lengths[m] = np.zeros(n, dtype=np.int64)
        by_shard = np.argsort(self._shard, kind="stable")  # (N,) positions grouped by shard
        bounds = np.searchsorted(self._shard[by_shard], np.arange(len(per_shard) + 1))
        for s, index in enumerate(per_shard):
            sel = by_shard[bounds[s] : bounds[s + 1]]  # visible clips of shard s
            rows = self._row[sel]
            self.missing[sel] = index["missing"][rows]
            for m in seqs:
                self._offset[m][sel] = index[f"{m}_offset"][rows]
                self.lengths[m][sel] = index[f"{m}_length"][rows]
        for a in (
            self.missing,
            self._shard,
            self._row,
            *self._offset.values(),
            *self.lengths.values(),
        ):
            a.setflags(write=False)
        self._maps: OrderedDict[tuple[int, str], np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, clip_id: object) -> bool:
        return isinstance(clip_id, str) and clip_id in self._pos

    def index(self, clip_id: str) -> int:
        """Position of ``clip_id`` in :attr:`ids`; KeyError if it is not in the store."""
        try:
            return self._pos[clip_id]
        except (KeyError, TypeError):
            raise KeyError(f"clip {clip_id!r} is not in the feature store {self.root}") from None

    def _map(self, s: int, name: str) -> np.memmap:
        """Memory map of one data file (opened on first use, at most _MAX_OPEN_MAPS kept)."""
        key = (s, name)
        mm = self._maps.get(key)
        if mm is None:
            rows = self._shard_rows[s][name]
            path = self.root / SHARDS / self._shard_names[s] / f"{name}.bin"
            try:
                mm = np.memmap(
                    path, dtype=self.dtype, mode="r", shape=(rows, _dim_of(name, self.dims))
                )
            except FileNotFoundError:
                raise StoreError(
                    f"{path} is gone: a writer replaced shard {self._shard_names[s]} of {self.root} "
                    "(compaction) after this reader opened the store; open the store again"
                ) from None
            self._maps[key] = mm
            if len(self._maps) > _MAX_OPEN_MAPS:
                self._maps.popitem(last=False)  # views handed out keep their own reference
        else:
            self._maps.move_to_end(key)
        return mm

    def _seq(self, i: int, m: str) -> np.ndarray | None:
        length = int(self.lengths[m][i])
        if length == 0:
            return None
        off = int(self._offset[m][i])
        return self._finite(
            i, m, self._map(int(self._shard[i]), m)[off : off + length]
        )  # (T, D) view

    def _finite(self, i: int, name: str, a: np.ndarray) -> np.ndarray:
        """``a`` itself, or a StoreError naming the store, shard and clip if it holds NaN/Inf."""
        if not _all_finite(a):
            bad = int(np.count_nonzero(~np.isfinite(a)))
            raise StoreError(
                f"{self.root}: clip {self.ids[i]!r} (shard {self._shard_names[int(self._shard[i])]}) "
                f"has {bad} NaN/Inf values in its {name} features; the store is damaged "
                f"(`taemi store verify {self.root}` lists every bad clip)"
            )
        return a

    def get(self, key: int | str) -> ClipFeatures:
        """One clip by position in :attr:`ids` (negative counts from the end) or by id.

        Raises StoreError (naming the store, shard and clip) if the clip holds NaN/Inf.
        """
        if isinstance(key, str):
            i = self.index(key)
        elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            n = len(self.ids)
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(
                    f"index {int(key)} out of range for feature store {self.root} ({n} clips)"
                )
        else:
            raise TypeError(f"feature store keys are int or str, got {type(key).__name__}")
        text = (
            None
            if self.missing[i, 2]
            else self._finite(i, "text", self._map(int(self._shard[i]), "text")[int(self._row[i])])
        )  # (D_t,)
        return ClipFeatures(
            clip_id=self.ids[i],
            audio=self._seq(i, "audio"),  # (T_a, D_a)
            vision=self._seq(i, "vision"),  # (T_v, D_v)
            text=text,
            text_tokens=self._seq(i, "text_tokens") if self.has_text_tokens else None,  # (T_t, D_t)
        )

    __getitem__ = get

    def __iter__(self) -> Iterator[ClipFeatures]:
        for i in range(len(self.ids)):
            yield self.get(i)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None  # memory maps are reopened in the unpickling process
        del state["_pos"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._maps = OrderedDict()
        self._pos = {cid: i for i, cid in enumerate(self.ids)}

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, {len(self)} clips, {self.manifest['dtype']})"


# --------------------------------------------------------------------------- info / verify


def store_info(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a store as plain JSON-serialisable values (see :func:`format_info`).

    Length statistics are over clips where the modality is present.
    """
    store = FeatureStore(root)
    m = store.manifest
    nbytes = (store.root / MANIFEST).stat().st_size
    for shard in m["shards"]:
        sdir = store.root / SHARDS / shard["name"]
        nbytes += sum(
            (sdir / name).stat().st_size for name in (*_bin_files(store.has_text_tokens), INDEX)
        )
    lengths: dict[str, dict[str, float] | None] = {}
    for name, length in store.lengths.items():
        present = length[length > 0]
        lengths[name] = (
            {"min": int(present.min()), "mean": float(present.mean()), "max": int(present.max())}
            if len(present)
            else None
        )
    rows = sum(int(s["clips"]) for s in m["shards"])
    return {
        "path": str(store.root),
        "format_version": m["version"],
        "dtype": m["dtype"],
        "dims": dict(store.dims),
        "text_tokens": store.has_text_tokens,
        "n_clips": len(store),
        "n_shards": len(m["shards"]),
        "bytes": int(nbytes),
        "missing": {mod: int(store.missing[:, k].sum()) for k, mod in enumerate(MODALITIES)},
        "lengths": lengths,
        "modalities": copy.deepcopy(m["modalities"]),
        "superseded": rows - len(store),
        "taemi_version": m.get("taemi_version"),
        "created": m.get("created"),
        "waveforms": _waveform_info(store.root),
    }


def _waveform_info(root: Path) -> dict[str, Any] | None:
    """The waveform cache's :meth:`~taemi.data.waveforms.WaveformCache.info`, None without
    one, ``{"error": message}`` when it cannot be opened."""
    from taemi.data.waveforms import WAVEFORMS, WaveformCache  # imports this module

    if not (root / WAVEFORMS).is_dir():
        return None
    try:
        return WaveformCache(root, max_seconds=None).info()
    except StoreError as exc:
        return {"error": str(exc)}


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # unreachable


def format_info(info: dict[str, Any]) -> str:
    """Human-readable multi-line text of :func:`store_info`, for ``taemi store info``."""
    dims = info["dims"]
    tokens = " (+ text token states)" if info["text_tokens"] else ""
    lines = [
        f"feature store {info['path']}",
        (
            f"  format       v{info['format_version']}, {info['dtype']}, {info['n_shards']} shards, "
            f"{_human_bytes(info['bytes'])} on disk"
        ),
        f"  clips        {info['n_clips']}"
        + (
            f" ({info['superseded']} superseded versions still on disk)"
            if info["superseded"]
            else ""
        ),
        f"  dims         audio {dims['audio']}, vision {dims['vision']}, text {dims['text']}{tokens}",
        "  missing      " + ", ".join(f"{m} {info['missing'][m]}" for m in MODALITIES),
    ]
    first = True
    for name, stats in info["lengths"].items():
        head = "  lengths      " if first else " " * 15
        first = False
        if stats is None:
            lines.append(f"{head}{name:<12} (none present)")
        else:
            lines.append(
                f"{head}{name:<12} min {stats['min']}, mean {stats['mean']:.1f}, max {stats['max']} rows"
            )
    if info["modalities"]:
        first = True
        for m, entry in info["modalities"].items():
            head = "  backbones    " if first else " " * 15
            first = False
            settings = json.dumps(entry.get("settings", {}), sort_keys=True)
            lines.append(f"{head}{m:<7} {entry['backbone']}  {settings}")
    else:
        lines.append("  backbones    (not recorded)")
    wave = info.get("waveforms")
    if wave is not None and "error" in wave:
        lines.append(f"  waveforms    unreadable: {wave['error']}")
    elif wave is not None:
        lines.append(
            f"  waveforms    {wave['n_clips']} clips, {wave['seconds'] / 3600:.2f} h of "
            f"{wave['sample_rate'] // 1000} kHz audio (<= {wave['max_seconds']:g} s each), "
            f"{_human_bytes(wave['bytes'])}"
        )
    if info.get("created"):
        lines.append(f"  created      {info['created']} (taemi {info.get('taemi_version')})")
    return "\n".join(lines)


def _scan_file(
    path: Path,
    row_width: int,
    dtype: np.dtype,
    on_bytes: Callable[[int], None],
) -> tuple[str, np.ndarray, np.ndarray | None]:
    """Stream a file once: sha256 of all bytes, and (for data files) the rows holding NaN/Inf.

    Reads ``_SCAN_CHUNK_BYTES`` at a time, so memory stays bounded whatever the file size.
    Returns (hex digest, indices of non-finite rows, indices of all-zero rows or None).
    ``row_width`` 0 means "hash only".
    """
    digest = hashlib.sha256()
    row_bytes = row_width * dtype.itemsize
    chunk = max(1, _SCAN_CHUNK_BYTES // row_bytes) * row_bytes if row_bytes else _SCAN_CHUNK_BYTES
    bad: list[np.ndarray] = []
    zero: list[np.ndarray] = []
    row = 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            digest.update(data)
            on_bytes(len(data))
            if row_bytes:
                usable = len(data) - len(data) % row_bytes  # a truncated file ends mid-row
                a = np.frombuffer(data[:usable], dtype=dtype).reshape(-1, row_width)  # (rows, D)
                bad.append(row + np.flatnonzero(~np.isfinite(a).all(axis=1)))
                zero.append(row + np.flatnonzero((a == 0).all(axis=1)))
                row += a.shape[0]
    empty = np.zeros(0, dtype=np.int64)
    bad_rows = np.concatenate(bad) if bad else empty
    zero_rows = np.concatenate(zero) if zero else empty
    return digest.hexdigest(), bad_rows, zero_rows if row_bytes else None


def verify_store(root: str | os.PathLike[str], *, progress: bool = False) -> list[str]:
    """Check a store thoroughly; return the problems found (an empty list means OK).

    Checks every listed shard: files present, sha256 and size against the manifest, file
    sizes against the index (rows x D x itemsize), index consistency (contiguous offsets,
    missing flag <=> length 0, unique valid ids), NaN/Inf values (naming clip and
    modality) and non-zero text rows of clips whose text is missing. Reads every byte
    once, in bounded chunks; ``progress=True`` shows a tqdm bar over bytes. A waveform
    cache (``waveforms/``, :mod:`taemi.data.waveforms`) is checked too (headers and sizes).
    """
    root = Path(root)
    try:
        manifest = _read_manifest(root)
    except StoreError as exc:
        return [str(exc)]
    dims = manifest["dims"]
    dtype = np.dtype(_DTYPES[manifest["dtype"]])
    tokens = bool(manifest["text_tokens"])
    bins = _bin_files(tokens)
    problems: list[str] = []

    total = 0
    for shard in manifest["shards"]:
        sdir = root / SHARDS / shard["name"]
        total += sum(_file_size(sdir / n) or 0 for n in {*bins, INDEX, *shard["files"]})
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        for shard in manifest["shards"]:
            problems += _verify_shard(root, shard, dims, dtype, tokens, bar.update)
    from taemi.data.waveforms import WAVEFORMS, WaveformCache  # imports this module

    if (root / WAVEFORMS).is_dir():
        try:
            problems += WaveformCache(root, max_seconds=None).verify()
        except StoreError as exc:
            problems.append(str(exc))
    return problems


def _verify_shard(
    root: Path,
    shard: dict[str, Any],
    dims: dict[str, int],
    dtype: np.dtype,
    tokens: bool,
    on_bytes: Callable[[int], None],
) -> list[str]:
    """Problems of one shard (see :func:`verify_store`)."""
    name = shard["name"]
    label = f"shard {name}"
    sdir = root / SHARDS / name
    if not sdir.is_dir():
        return [f"{label}: directory {sdir} is missing (listed in the manifest)"]
    problems: list[str] = []
    bins = _bin_files(tokens)
    recorded: dict[str, Any] = shard["files"]
    for fname in sorted({*bins, INDEX} - set(recorded)):
        problems.append(f"{label}: {fname} has no checksum in the manifest")

    index: dict[str, np.ndarray] | None = None
    try:
        index = _load_index(sdir / INDEX, tokens)
    except StoreError as exc:
        problems.append(f"{label}: {exc}")
    sizes = {fname: _file_size(sdir / fname) for fname in bins}
    if index is not None:
        problems += _index_problems(label, index, dims, tokens, dtype.itemsize, sizes)
        if len(index["ids"]) != shard["clips"]:
            problems.append(
                f"{label}: index has {len(index['ids'])} clips, the manifest says {shard['clips']}"
            )

    for fname in sorted({*bins, INDEX, *recorded}):
        path = sdir / fname
        size = _file_size(path)
        if size is None:
            if fname not in bins or index is None:  # else _index_problems reported it
                problems.append(f"{label}: {fname} is missing")
            continue
        entry = recorded.get(fname)
        if isinstance(entry, dict) and entry.get("bytes") != size:
            problems.append(
                f"{label}: {fname} has {size} bytes, the manifest records {entry.get('bytes')}"
            )
        modality = fname[: -len(".bin")] if fname in bins else None
        width = _dim_of(modality, dims) if modality else 0
        digest, bad_rows, zero_rows = _scan_file(path, width, dtype, on_bytes)
        if isinstance(entry, dict) and entry.get("sha256") != digest:
            problems.append(
                f"{label}: {fname} sha256 mismatch (file {digest[:16]}..., manifest {str(entry.get('sha256'))[:16]}...)"
            )
        if modality is None or index is None:
            continue
        ids = index["ids"]
        n = len(ids)
        if modality == "text":
            clips = bad_rows[bad_rows < n]
            text_missing = index["missing"][:, 2]
            nonzero = np.setdiff1d(
                np.flatnonzero(text_missing), zero_rows if zero_rows is not None else []
            )
            for k in nonzero[:_MAX_NAMED_CLIPS]:
                problems.append(
                    f"{label}: {fname}: clip {str(ids[k])!r} has text marked missing but a non-zero row"
                )
        else:
            end = (
                index[f"{modality}_offset"] + index[f"{modality}_length"]
            )  # (n,) exclusive row ends
            clips = np.unique(np.searchsorted(end, bad_rows, side="right"))
            clips = clips[clips < n]
        for k in clips[:_MAX_NAMED_CLIPS]:
            problems.append(f"{label}: {fname}: clip {str(ids[k])!r} {modality} has NaN/Inf values")
        if len(clips) > _MAX_NAMED_CLIPS:
            problems.append(
                f"{label}: {fname}: ... and {len(clips) - _MAX_NAMED_CLIPS} more clips with NaN/Inf"
            )
    return problems
