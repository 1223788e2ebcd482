"""Reading a feature store: :class:`FeatureStore`, a memory-mapped read-only view. The
format is described in :mod:`taemi.store`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from taemi.store.clip import ClipFeatures
from taemi.store.format import (
    _DTYPES,
    INDEX,
    SHARDS,
    StoreError,
    _bin_files,
    _dim_of,
    _file_size,
    _index_problems,
    _load_index,
    _read_manifest,
    _seq_modalities,
)

__all__ = ["FeatureStore"]

#: How many memory maps a FeatureStore keeps open (each holds a file descriptor).
_MAX_OPEN_MAPS = 256


def _all_finite(a: np.ndarray) -> bool:
    """True if ``a`` (store dtype, non-empty) holds no NaN/Inf. float16 is tested on its bits
    (all exponent bits set = Inf or NaN): ~10x faster than ``np.isfinite`` on float16."""
    if a.dtype == np.float16:
        return bool((a.view(np.uint16) & 0x7C00).max() < 0x7C00)
    return bool(np.isfinite(a).all())


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
