"""A dataset split held in device memory, batches built there: :class:`ResidentFeatures`.

For GPU training. A model step on a GPU takes a few milliseconds; reading clips from the
memory-mapped store, padding them with numpy and copying each batch to the device
(:class:`taemi.data.dataset.ClipDataset` + ``collate``) costs more than that per batch.
Instead every clip of a split is read ONCE (through ``dataset[i]``, so trimming and hidden
modalities follow :class:`~taemi.data.dataset.ClipDataset` exactly) and packed on the device:

- each sequence modality (``audio``, ``vision``, and ``text_tokens`` when the dataset
  yields them) as ONE flat ``(total_steps + 1, D)`` tensor in the store's dtype, the clips'
  trimmed rows one after another, the last row all zeros;
- ``text`` as ``(N, D_t)`` (rows of clips without text are zeros), ``targets`` as
  ``(N, E)`` float32, the per-clip offsets / lengths (int64) and ``missing`` flags (bool).

A batch is then a few index gathers on the device (:meth:`ResidentFeatures.batch`):
padded positions and missing modalities gather the zero row. The host only computes the
padded lengths from numpy copies of the lengths and sends the batch's indices (one small
copy); nothing waits for the device. The batch equals
``dataset.collator()([dataset[i] for i in indices]).to(device)`` (``tests/test_resident.py``).

Memory cost (:func:`resident_bytes`, from the store index without reading features): the
split's trimmed features in the store's dtype (float16: 2 bytes a value), e.g. ~8,000
clips of up to 599 audio + 400 face frames at a few hundred dimensions are a few GB, plus
the targets as float32 and ~50 bytes of indices per clip. Loading stages
``chunk_clips`` clips at a time in host memory (pinned on CUDA), so host memory stays
bounded. :func:`memory_available` says how much the device has free.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from taemi.data.batch import Batch, padded_length
from taemi.data.dataset import ClipDataset

__all__ = ["ResidentFeatures", "memory_available", "resident_bytes"]

_TORCH_DTYPES = {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32}


def _sequences(dataset: ClipDataset) -> list[str]:
    """The sequence modalities a batch of ``dataset`` holds."""
    return ["audio", "vision"] + (["text_tokens"] if dataset.text_tokens else [])


def _dim(dataset: ClipDataset, name: str) -> int:
    return dataset.store.dims["text" if name == "text_tokens" else name]


def _index(dataset: ClipDataset) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per dataset position, from the store index (no feature is read): the trimmed length
    of each sequence modality ``{name: (N,) int64}`` (0 = missing or hidden) and the
    ``(N, 3)`` bool missing flags (audio, vision, text) as ``collate`` sets them."""
    store = dataset.store
    pos = np.fromiter((store.index(i) for i in dataset.ids), np.int64, len(dataset))  # (N,)
    missing = np.stack(
        [
            store.lengths["audio"][pos] == 0,
            store.lengths["vision"][pos] == 0,
            store.missing[pos, 2],
        ],
        axis=1,
    )  # (N, 3); a present sequence trimmed to 0 steps is NOT missing (as in collate)
    for k, m in enumerate(("audio", "vision", "text")):
        if m in dataset.hidden:
            missing[:, k] = True
    trimmed = dataset.lengths()  # (N, K): audio, vision[, text_tokens]; hidden -> 0
    lengths = {name: trimmed[:, k] for k, name in enumerate(_sequences(dataset))}
    return lengths, missing


def _layout_bytes(dataset: ClipDataset, lengths: dict[str, np.ndarray]) -> int:
    """Bytes of every tensor :class:`ResidentFeatures` keeps on the device."""
    n = len(dataset)
    itemsize = dataset.store.dtype.itemsize
    total = 0
    max_t = 1
    for name, ln in lengths.items():
        total += (int(ln.sum()) + 1) * _dim(dataset, name) * itemsize  # flat rows + zero row
        total += 2 * n * 8  # offsets, lengths (int64)
        max_t = max(max_t, padded_length(int(ln.max(initial=0)), dataset.length_quantum))
    total += n * dataset.store.dims["text"] * itemsize  # text
    total += n * 3  # missing (bool)
    if dataset.targets is not None:
        total += dataset.targets.size * 4  # float32
    return total + max_t * 8  # cached arange (int64)


def resident_bytes(dataset: ClipDataset) -> int:
    """Bytes ``ResidentFeatures(dataset, device)`` holds on the device (exactly its
    ``nbytes``): the trimmed features in the store's dtype, one zero row per sequence
    modality, text, targets as float32 and the small index tensors. Computed from the
    store index; no feature is read."""
    return _layout_bytes(dataset, _index(dataset)[0])


def memory_available(device: torch.device | str) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA; on CPU the kernel's
    ``MemAvailable`` (/proc/meminfo), else psutil, else free pages (``os.sysconf``). Other
    devices: 0, so that an automatic choice never puts the data there."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import psutil  # optional
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(psutil.virtual_memory().available)


class ResidentFeatures:
    """The features of ``dataset`` resident on ``device``; :meth:`batch` builds padded
    batches there. See the module docstring.

    Args:
        dataset: the split; every clip is read once, through ``dataset[i]``.
        device: where the features live (a CUDA device for training; CPU works too).
        progress: show a progress bar while loading.
        chunk_clips: clips staged in host memory per copy to the device.
    """

    def __init__(
        self,
        dataset: ClipDataset,
        device: torch.device | str,
        *,
        progress: bool = False,
        chunk_clips: int = 512,
    ):
        if isinstance(chunk_clips, bool) or not isinstance(chunk_clips, int) or chunk_clips < 1:
            raise ValueError(f"chunk_clips must be a positive int, got {chunk_clips!r}")
        start = time.perf_counter()
        self.device = torch.device(device)
        self.ids: list[str] = list(dataset.ids)
        self._ids = np.array(self.ids, dtype=object)  # (N,)
        self.quantum = dataset.length_quantum
        self.dims = dict(dataset.store.dims)
        self.text_tokens = dataset.text_tokens
        n = len(dataset)
        dtype = _TORCH_DTYPES[np.dtype(dataset.store.dtype)]
        cuda = self.device.type == "cuda"

        lengths, missing = _index(dataset)
        self.lengths: dict[str, np.ndarray] = lengths  # host copies: (N,) int64 each
        self.offsets: dict[str, np.ndarray] = {
            m: np.concatenate([[0], np.cumsum(ln)[:-1]]).astype(np.int64) if n else ln.copy()
            for m, ln in lengths.items()
        }  # (N,) first row of each clip in the flat tensor
        self._flat: dict[str, torch.Tensor] = {
            m: torch.zeros(int(ln.sum()) + 1, _dim(dataset, m), dtype=dtype, device=self.device)
            for m, ln in lengths.items()
        }  # (total_steps + 1, D), last row zeros
        self._text = torch.zeros(n, self.dims["text"], dtype=dtype, device=self.device)  # (N, D_t)

        # Host staging, one buffer per modality for `chunk_clips` clips; refilled only once
        # the previous copy out of it is done (`copied`).
        starts = list(range(0, n, chunk_clips))
        stage: dict[str, torch.Tensor] = {}
        for m, ln in [*lengths.items(), ("text", np.ones(n, np.int64))]:
            rows = max([int(ln[s : s + chunk_clips].sum()) for s in starts], default=0)
            stage[m] = torch.empty(
                max(rows, 1), self.dims["text" if m == "text_tokens" else m], dtype=dtype
            )
            if cuda:
                stage[m] = stage[m].pin_memory()
        copied = torch.cuda.Event() if cuda else None
        with tqdm(total=n, disable=not progress, desc=f"load to {self.device}", unit="clip") as bar:
            for s in starts:
                items = [dataset[i] for i in range(s, min(s + chunk_clips, n))]
                if copied is not None:
                    copied.synchronize()
                for m in lengths:
                    buf, r = stage[m].numpy(), 0  # (rows, D)
                    for k, it in enumerate(items):
                        a = getattr(it, m)
                        t = 0 if a is None else len(a)
                        if t != lengths[m][s + k]:
                            raise RuntimeError(
                                f"clip {it.clip_id!r}: {m} has {t} steps, the store index says "
                                f"{lengths[m][s + k]} after trimming"
                            )
                        if t:
                            buf[r : r + t] = a
                            r += t
                    o = int(self.offsets[m][s])
                    self._flat[m][o : o + r].copy_(stage[m][:r], non_blocking=True)
                buf = stage["text"].numpy()  # (chunk, D_t)
                for k, it in enumerate(items):
                    buf[k] = 0 if it.text is None else it.text
                self._text[s : s + len(items)].copy_(stage["text"][: len(items)], non_blocking=True)
                if copied is not None:
                    copied.record()
                bar.update(len(items))
        if cuda:
            torch.cuda.synchronize(self.device)

        self._column = {m: 2 * k for k, m in enumerate(lengths)}  # offset column; length next
        self._host_lengths = np.stack(list(lengths.values()), axis=1)  # (N, modalities)
        self._meta = self._put(
            np.stack([a for m in lengths for a in (self.offsets[m], lengths[m])], axis=1)
        )  # (N, 2 * modalities) int64: offset, length of each sequence modality
        self._missing = self._put(missing)  # (N, 3) bool
        self._targets = None if dataset.targets is None else self._put(dataset.targets)  # (N, E)
        max_t = max(
            [padded_length(int(ln.max(initial=0)), self.quantum) for ln in lengths.values()]
        )
        self._arange = torch.arange(max_t, device=self.device)  # (max_T,)
        tensors = [
            *self._flat.values(),
            self._text,
            self._meta,
            self._missing,
            self._arange,
        ] + ([] if self._targets is None else [self._targets])
        self.nbytes: int = sum(t.numel() * t.element_size() for t in tensors)
        self.load_seconds: float = time.perf_counter() - start

    def _put(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"ResidentFeatures({len(self)} clips on {self.device}, "
            f"{self.nbytes / 2**20:.1f} MiB, loaded in {self.load_seconds:.1f} s)"
        )

    def _gather(self, m: str, T: int, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of modality ``m`` padded to ``T`` steps: (B, T, D) float32 and the (B, T)
        mask; ``meta`` is the batch's (B, 2 * modalities) rows of ``_meta``."""
        steps = self._arange[:T]  # (T,)
        c = self._column[m]
        valid = steps < meta[:, c + 1 : c + 2]  # (B, T)
        pos = torch.where(valid, meta[:, c : c + 1] + steps, self._flat[m].shape[0] - 1)
        x = self._flat[m].index_select(0, pos.view(-1))  # (B * T, D); padding: the zero row
        return x.view(len(meta), T, -1).float(), valid

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """The padded batch of dataset positions ``indices`` on the device: the same as
        ``dataset.collator()([dataset[i] for i in indices]).to(device)``. Never waits for
        the device (no host sync)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (B,)
        n = len(self)
        if idx.size == 0:
            raise ValueError("a batch needs at least one index")
        if idx.min() < 0:
            if idx.min() < -n:
                raise IndexError(f"batch indices out of range for {n} clips")
            idx = idx % n
        if idx.max() >= n:
            raise IndexError(f"batch indices out of range for {n} clips")
        longest = self._host_lengths[idx].max(0)  # (modalities,), on the host: no sync
        T = {m: padded_length(int(t), self.quantum) for m, t in zip(self._column, longest)}
        sel = torch.from_numpy(idx)
        if self.device.type == "cuda":
            sel = sel.pin_memory()
        sel = sel.to(self.device, non_blocking=True)  # (B,)
        meta = self._meta.index_select(0, sel)  # (B, 2 * modalities)
        audio, audio_mask = self._gather("audio", T["audio"], meta)  # (B, T_a, D_a), (B, T_a)
        vision, vision_mask = self._gather("vision", T["vision"], meta)  # (B, T_v, D_v), (B, T_v)
        tok = tok_mask = None
        if self.text_tokens:
            tok, tok_mask = self._gather("text_tokens", T["text_tokens"], meta)  # (B, T_t, D_t)
        return Batch(
            audio=audio,
            audio_mask=audio_mask,
            vision=vision,
            vision_mask=vision_mask,
            text=self._text.index_select(0, sel).float(),  # (B, D_t)
            missing=self._missing.index_select(0, sel),  # (B, 3)
            text_tokens=tok,
            text_tokens_mask=tok_mask,
            target=None if self._targets is None else self._targets.index_select(0, sel),
            ids=tuple(self._ids[idx].tolist()),
        )
