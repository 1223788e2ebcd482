"""The feature store's on-disk format: file names, manifest, shard index, shared checks.

The one definition of the store's names and of what a valid manifest and index are;
:mod:`taemi.store.writer`, :mod:`taemi.store.reader` and :mod:`taemi.store.info` build on
it. The format itself is described in :mod:`taemi.store`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from taemi import MODALITIES, __version__
from taemi.store.clip import check_clip_id

__all__ = [
    "ERRORS_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX",
    "LOCK",
    "MANIFEST",
    "SHARDS",
    "SUMMARY_FILE",
    "TRANSCRIPTS",
    "StoreError",
]

#: Value of the manifest's "format" field.
FORMAT_NAME = "taemi-feature-store"
#: The store format version this package reads and writes.
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
SHARDS = "shards"
LOCK = ".lock"
INDEX = "index.npz"
#: What extraction writes beside the features (the one definition every reader and copier uses).
TRANSCRIPTS = "transcripts"  # STORE/transcripts/{id}.txt
#: One JSON line per clip or rejected file; written by both extraction and `taemi import`.
ERRORS_FILE = "extract_errors.jsonl"
SUMMARY_FILE = "extract_summary.json"  # counts and seconds per stage of the last run
_TMP_PREFIX = ".tmp-"
_SHARD_NAME = re.compile(r"^\d{5,}$")
#: Store dtype name -> on-disk numpy dtype (always little-endian).
_DTYPES: dict[str, str] = {"float16": "<f2", "float32": "<f4"}
#: Files a writer may leave in a root without a manifest (a crash during creation).
_CREATION_LEFTOVERS = {LOCK, SHARDS, MANIFEST + ".tmp"}
#: Bytes read per step by _scan_file (rounded down to whole rows).
_SCAN_CHUNK_BYTES = 8 << 20
#: Per file, how many clips with bad values verify_store names before summarising.
_MAX_NAMED_CLIPS = 10


class StoreError(Exception):
    """A problem with a feature store on disk; the message names the store, shard and file."""


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
