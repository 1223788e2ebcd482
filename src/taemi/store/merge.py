"""Merging feature stores: the shard stores of a distributed extraction into one store.

:func:`merge_stores` (``taemi store merge OUT SHARD...``) copies every clip of every
shard store into ``OUT`` through :class:`taemi.store.StoreWriter`, one clip at a
time (memory-mapped reads, bounded memory whatever the shards' sizes), then runs
:func:`taemi.store.verify_store` on the result and raises if it finds a problem.

What must agree. The shards must have the same dtype, dims, text-token setting and
per-modality provenance (backbone and settings); ``OUT``, if it exists already, too. A
clip id may occur in one shard only (a distributed extraction assigns each id to
exactly one shard, so a duplicate means the wrong stores were given). A mismatch or a
duplicate is a :class:`~taemi.store.StoreError` naming both stores and the field
or ids, raised before anything is written.

Besides the store proper, a shard root holds what extraction writes beside it:

- side folders (``transcripts/``, ``waveforms/``, any other folder but ``shards/``):
  a file named after a clip of that shard (``{id}.txt``, ``{id}.npy``, or a folder
  ``{id}/``) is copied with its clip; any other file (``waveforms/manifest.json``) is
  shared: copied once, and it must be byte-identical in every shard that has it;
- other top-level files: shared, the same rule;
- ``extract_errors.jsonl``: the shards' lines, concatenated, each with a ``shard`` key
  (the shard store's path); lines of ``OUT``'s own file from other sources are kept;
- ``extract_summary.json``: rewritten for ``OUT``: counts and stage seconds summed over
  the shards, ``wall_seconds`` the longest shard's (the workers ran side by side),
  ``started`` the earliest, ``interrupted`` true if any shard's was, and ``shards``
  listing each shard's own counts.

Resuming. Clips already in ``OUT`` are skipped (their per-clip side files are copied
if absent), so rerunning an interrupted merge finishes it; the writer commits what it
copied even when interrupted. ``replace=True`` instead supersedes the clips already in
``OUT`` with the shards' versions (after a forced re-extraction); every clip is copied
again then, and older versions stay on disk as superseded rows.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taemi.store import (
    ERRORS_FILE,
    LOCK,
    MANIFEST,
    SHARDS,
    SUMMARY_FILE,
    FeatureStore,
    StoreError,
    StoreWriter,
    verify_store,
)

log = logging.getLogger(__name__)

__all__ = ["MergeReport", "merge_stores"]

#: Top-level entries of a shard root that are not copied as shared files.
_NOT_SHARED = {MANIFEST, MANIFEST + ".tmp", LOCK, SHARDS, ERRORS_FILE, SUMMARY_FILE}
#: How many duplicate ids an error names.
_MAX_NAMED = 5


@dataclass
class MergeReport:
    """What :func:`merge_stores` did."""

    out: str
    shards: list[str]
    copied: int = 0  # clips written to OUT by this call
    skipped: int = 0  # clips already in OUT (an earlier, interrupted merge)
    side_files: int = 0  # per-clip and shared side files copied
    error_lines: int = 0  # lines of the merged extract_errors.jsonl taken from the shards
    summary: dict[str, Any] | None = None  # the merged extract_summary.json; None: no shard had one
    clips: int = 0  # clips in OUT afterwards
    per_shard: list[int] = field(default_factory=list)  # clips of each shard


# --------------------------------------------------------------------------- checks


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first dotted key where two JSON values differ: (path, value in a, value in b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k}", a.get(k, "<absent>"), b.get(k, "<absent>")
            d = _first_difference(a[k], b[k], f"{path}.{k}")
            if d is not None:
                return d
        return None
    return None if a == b else (path, a, b)


def _check_compatible(first: Path, m1: dict, other: Path, m2: dict) -> None:
    """StoreError naming both stores and the first field where their manifests differ."""
    for key in ("dtype", "dims", "text_tokens", "modalities"):
        d = _first_difference(m1.get(key), m2.get(key), key)
        if d is not None:
            where, v1, v2 = d
            raise StoreError(
                f"cannot merge {other} with {first}: {where} differs ({v2!r} in {other}, "
                f"{v1!r} in {first}); stores of different settings must not be mixed"
            )


def _check_not_being_written(root: Path) -> None:
    """StoreError if a writer (an extraction worker still running) holds ``root/.lock``."""
    lock = root / LOCK
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return  # no writer
    import fcntl  # POSIX only, as the writer's lock

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 64).decode("ascii", "replace").strip()
            raise StoreError(
                f"{root} is being written (lock {lock} held by pid {pid or '?'}); merge it once its "
                "extraction has finished"
            ) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _duplicate_ids(stores: list[FeatureStore]) -> None:
    owner: dict[str, int] = {}
    dups: list[tuple[str, int, int]] = []
    for s, store in enumerate(stores):
        for cid in store.ids:
            o = owner.setdefault(cid, s)
            if o != s:
                dups.append((cid, o, s))
    if dups:
        cid, a, b = dups[0]
        more = f" (and {len(dups) - 1} more duplicate ids)" if len(dups) > 1 else ""
        named = ", ".join(repr(d[0]) for d in dups[:_MAX_NAMED])
        raise StoreError(
            f"cannot merge: clip {cid!r} is in both {stores[a].root} and {stores[b].root}{more}; "
            f"duplicate ids: {named}. Each clip must come from exactly one shard store"
        )


# --------------------------------------------------------------------------- side files


def _walk_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder`` (relative paths), skipping hidden names and ``*.tmp`` leftovers."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and not name.endswith(".tmp"):
                yield (Path(dirpath) / name).relative_to(folder)


def _side_files(root: Path, ids: set[str]) -> tuple[dict[str, list[Path]], list[Path]]:
    """(per-clip files by clip id, shared files) of a shard root, as paths relative to it.

    A file in a side folder belongs to a clip when its name without the last suffix
    (``{id}.txt``), or the first folder under the side folder (``{id}/...``), is one of
    ``ids``; every other file, in a side folder or at the top level, is shared.
    """
    per_clip: dict[str, list[Path]] = {}
    shared: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name in _NOT_SHARED or entry.name.startswith("."):
            continue
        if entry.is_file():
            if not entry.name.endswith(".tmp"):
                shared.append(Path(entry.name))
            continue
        if not entry.is_dir():
            continue
        for rel in _walk_files(entry):
            owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
            if owner in ids:
                per_clip.setdefault(owner, []).append(Path(entry.name) / rel)
            else:
                shared.append(Path(entry.name) / rel)
    return per_clip, shared


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.merge.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _copy_shared(shard: Path, rel: Path, out: Path, origin: dict[Path, Path]) -> int:
    """Copy a shared file unless ``out`` has it; StoreError if the copies differ."""
    src, dst = shard / rel, out / rel
    if dst.exists():
        if not _same_bytes(src, dst):
            first = origin.get(rel, out)
            raise StoreError(
                f"cannot merge {shard}: {rel} differs from the one of {first} ({dst}); a file that "
                "is not per clip must be identical in every shard"
            )
        origin.setdefault(rel, shard)
        return 0
    _copy_atomic(src, dst)
    origin[rel] = shard
    return 1


# --------------------------------------------------------------------------- reports


def _merge_errors(out: Path, shards: list[Path]) -> int:
    """Rewrite ``out/extract_errors.jsonl``: its lines from elsewhere, then every shard's lines."""
    names = {str(s) for s in shards}
    target = out / ERRORS_FILE
    tmp = out / (ERRORS_FILE + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        if target.is_file():
            for line in _jsonl(target):
                if line.get("shard") not in names:
                    fh.write(json.dumps(line, ensure_ascii=True) + "\n")
        for shard in shards:
            path = shard / ERRORS_FILE
            if path.is_file():
                for line in _jsonl(path):
                    fh.write(json.dumps({**line, "shard": str(shard)}, ensure_ascii=True) + "\n")
                    n += 1
    if n or target.is_file():
        os.replace(tmp, target)
    else:
        tmp.unlink()
    return n


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for k, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise StoreError(f"{path} line {k}: not JSON ({e})") from e


def _combine(key: str, values: list[Any]) -> Any:
    """One summary field over the shards (see the module docstring)."""
    if key == "started":
        return min(values)
    if key == "wall_seconds":
        return max(values)
    if all(isinstance(v, bool) for v in values):
        return any(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values)
    if all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: _combine(k, [v[k] for v in values if k in v]) for k in keys}
    return values[0] if all(v == values[0] for v in values) else values


def _merge_summaries(out: Path, shards: list[Path]) -> dict[str, Any] | None:
    parts: list[dict[str, Any]] = []
    absent: list[str] = []
    for shard in shards:
        path = shard / SUMMARY_FILE
        if not path.is_file():
            absent.append(str(shard))
            continue
        try:
            parts.append({**json.loads(path.read_text(encoding="utf-8")), "store": str(shard)})
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: cannot read the extraction summary: {e}") from e
    if not parts:
        return None
    keys = list(dict.fromkeys(k for p in parts for k in p if k not in ("store", "errors_file")))
    merged: dict[str, Any] = {"store": str(out)}
    merged.update({k: _combine(k, [p[k] for p in parts if k in p]) for k in keys})
    errors = out / ERRORS_FILE
    merged["errors_file"] = str(errors) if errors.is_file() else None
    merged["shards"] = [
        {
            k: p.get(k)
            for k in ("store", "total", "done", "skipped", "failed", "wall_seconds", "interrupted")
        }
        for p in parts
    ]
    if absent:
        merged["shards_without_summary"] = absent
        log.warning(
            "%d shard store(s) have no %s: %s", len(absent), SUMMARY_FILE, ", ".join(absent)
        )
    tmp = out / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2), encoding="utf-8")
    os.replace(tmp, out / SUMMARY_FILE)
    return merged


# --------------------------------------------------------------------------- merge


def merge_stores(
    out: str | os.PathLike[str],
    shards: Iterable[str | os.PathLike[str]],
    *,
    replace: bool = False,
    progress: bool = True,
) -> MergeReport:
    """Merge the feature stores ``shards`` into ``out`` (created, or extended); see the module
    docstring. Returns a :class:`MergeReport`; raises StoreError on incompatible shards,
    duplicate ids, differing shared files, or a merged store that fails verification."""
    from tqdm.auto import tqdm

    out = Path(out)
    roots = [Path(s) for s in shards]
    if not roots:
        raise ValueError("merge_stores: no shard stores given")
    resolved = [r.resolve() for r in roots]
    if len(set(resolved)) != len(resolved):
        twice = next(r for r in roots if resolved.count(r.resolve()) > 1)
        raise ValueError(f"merge_stores: shard store {twice} is given twice")
    if out.resolve() in resolved:
        raise ValueError(f"merge_stores: the output {out} is also one of the shard stores")
    for r in roots:
        _check_not_being_written(r)
    stores = [FeatureStore(r) for r in roots]  # StoreError naming the store if one is broken
    for r, s in zip(roots[1:], stores[1:]):
        _check_compatible(roots[0], stores[0].manifest, r, s.manifest)
    if (out / MANIFEST).is_file():
        _check_compatible(out, FeatureStore(out).manifest, roots[0], stores[0].manifest)
    _duplicate_ids(stores)

    m = stores[0].manifest
    report = MergeReport(
        out=str(out), shards=[str(r) for r in roots], per_shard=[len(s) for s in stores]
    )
    origin: dict[Path, Path] = {}  # shared file -> the shard it was first seen in
    with (
        StoreWriter(
            out,
            dims=m["dims"],
            dtype=m["dtype"],
            text_tokens=m["text_tokens"],
            modalities=m["modalities"],
        ) as writer,
        tqdm(total=sum(report.per_shard), desc="merge", unit="clip", disable=not progress) as bar,
    ):
        for root, store in zip(roots, stores):
            per_clip, shared = _side_files(root, set(store.ids))
            for rel in shared:
                report.side_files += _copy_shared(root, rel, out, origin)
            for clip in store:
                files = per_clip.get(clip.clip_id, [])
                if clip.clip_id in writer and not replace:
                    report.skipped += 1
                    todo = [rel for rel in files if not (out / rel).exists()]
                else:
                    writer.add(clip, replace=replace)
                    report.copied += 1
                    todo = files
                for rel in todo:
                    _copy_atomic(root / rel, out / rel)
                report.side_files += len(todo)
                bar.update(1)
    report.error_lines = _merge_errors(out, roots)
    report.summary = _merge_summaries(out, roots)

    problems = verify_store(out, progress=progress)
    if problems:
        listed = "\n  - ".join(problems[:20])
        raise StoreError(
            f"{out}: the merged store fails verification ({len(problems)} problems):\n  - {listed}"
        )
    merged = FeatureStore(out)
    lost = [cid for s in stores for cid in s.ids if cid not in merged]
    if lost:
        raise StoreError(
            f"{out}: {len(lost)} clips of the shards are not in the merged store, e.g. {lost[:5]}"
        )
    report.clips = len(merged)
    log.info(
        "merged %d shard stores into %s: %d clips copied, %d already there, %d side files",
        len(roots),
        out,
        report.copied,
        report.skipped,
        report.side_files,
    )
    return report
