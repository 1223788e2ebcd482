"""Inspecting a feature store: :func:`store_info` and :func:`format_info` (``taemi store
info``) and :func:`verify_store` (``taemi store verify``), which reads every byte once.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from taemi import MODALITIES
from taemi.store.format import (
    _DTYPES,
    _MAX_NAMED_CLIPS,
    INDEX,
    MANIFEST,
    SHARDS,
    StoreError,
    _bin_files,
    _dim_of,
    _file_size,
    _index_problems,
    _load_index,
    _read_manifest,
    _scan_file,
)
from taemi.store.reader import FeatureStore
from taemi.store.waveforms import WAVEFORMS, WaveformCache

__all__ = ["format_info", "store_info", "verify_store"]


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
    """The waveform cache's :meth:`~taemi.store.waveforms.WaveformCache.info`, None without
    one, ``{"error": message}`` when it cannot be opened."""
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


def verify_store(root: str | os.PathLike[str], *, progress: bool = False) -> list[str]:
    """Check a store thoroughly; return the problems found (an empty list means OK).

    Checks every listed shard: files present, sha256 and size against the manifest, file
    sizes against the index (rows x D x itemsize), index consistency (contiguous offsets,
    missing flag <=> length 0, unique valid ids), NaN/Inf values (naming clip and
    modality) and non-zero text rows of clips whose text is missing. Reads every byte
    once, in bounded chunks; ``progress=True`` shows a tqdm bar over bytes. A waveform
    cache (``waveforms/``, :mod:`taemi.store.waveforms`) is checked too (headers and sizes).
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
