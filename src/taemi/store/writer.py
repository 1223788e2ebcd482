"""Writing a feature store: :class:`StoreWriter` (atomic shards, commit policy,
compaction) and :func:`check_writable`. The format and its crash-safety are described
in :mod:`taemi.store`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from taemi import __version__
from taemi.locking import acquire_lock, check_unlocked, release_lock
from taemi.store.clip import ClipFeatures, check_clip_id
from taemi.store.format import (
    _CREATION_LEFTOVERS,
    _DTYPES,
    _SHARD_NAME,
    _TMP_PREFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX,
    LOCK,
    MANIFEST,
    SHARDS,
    StoreError,
    _bin_files,
    _check_dims,
    _check_dtype,
    _check_modalities,
    _dim_of,
    _fsync_dir,
    _load_index,
    _read_manifest,
    _scan_file,
    _seq_modalities,
    _write_manifest,
)
from taemi.store.reader import FeatureStore

logger = logging.getLogger(__name__)

__all__ = ["StoreWriter", "check_writable"]

#: A writer with compact=True merges a run of small shards once it has this many.
_COMPACT_SHARDS = 8


def _held(root: Path, who: str) -> str:
    """The message when another process holds the store's writer lock."""
    return f"{root} is being written by another process{who}; lock {root / LOCK} is held"


class _ShardDamaged(Exception):
    """A shard's files do not match their manifest checksums (compaction leaves it alone)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        self._lock_fd = acquire_lock(
            self.root / LOCK, StoreError, functools.partial(_held, self.root)
        )
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
        :mod:`taemi.store` docstring), so that small shards do not pile up during a long run."""
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
        into one shard per group, crash-safely (:mod:`taemi.store` docstring). Returns the number of
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
                logger.warning(
                    "%s: shards %s not compacted: %s (run `taemi store verify %s`)",
                    self.root,
                    ", ".join(group),
                    exc,
                    self.root,
                )
                continue
            except OSError as exc:  # e.g. a full disk: the store is as it was; stop trying
                logger.warning(
                    "%s: compaction stopped, shards %s stay as they are: %s",
                    self.root,
                    ", ".join(group),
                    exc,
                )
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
                name: np.memmap(
                    sdir / f"{name}.bin",
                    dtype=self.dtype,
                    mode="r",
                    shape=(rows, _dim_of(name, dims)),
                )
                for name, rows in (
                    {m: int(index[f"{m}_length"].sum()) for m in seqs} | {"text": len(index["ids"])}
                ).items()
                if rows > 0
            }
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
        logger.info(
            "%s: compacted shards %s into shard %s (%d clips)",
            self.root,
            ", ".join(group),
            name,
            len(where),
        )

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
