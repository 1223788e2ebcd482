"""Read speed of a paper-dimension feature store, through each layer of the input pipeline,
against a raw sequential read of the same files, all in one run.

Measured cold (the store's files dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` just before each run) and warm (run again right after),
each the best of ``--repeats`` runs:

- raw: the shard ``*.bin`` files read sequentially with ``readinto`` in 16 MiB chunks;
- store: ``FeatureStore.get`` of every clip, each modality materialised as float32
  (``np.asarray(x, dtype=np.float32)``), in sequential and in random order; and, to split
  reading from converting, copied out as float16 (sequential);
- loader: ``DataLoader(ClipDataset, batch_size=32, random order, collate_fn=Collator)``
  with ``num_workers`` 0 and 2, as the trainer builds it (worker start-up included).

Every path reads every clip once, i.e. the same bytes, so MB/s (store bytes, float16,
per second) and clips/s relate to raw reading by the same ratio. The loader also pads
each batch to its longest clip in float32, which the ratio charges to it.

Usage::

    python benchmarks/store_read.py                        # 300 clips (~0.4 GB) in a temp dir
    python benchmarks/store_read.py --clips 2000 --workdir /data/bench   # keeps the store
    python benchmarks/store_read.py --store PATH           # an existing store
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _paper_store import (
    build_store,
    check_free_disk,
    data_files,
    drop_from_page_cache,
    expected_bytes,
    resident_fraction,
    work_folder,
)
from torch.utils.data import DataLoader, RandomSampler

from taemi.data.dataset import ClipDataset, Collator
from taemi.store import FeatureStore

CHUNK = 16 << 20  # raw read chunk, bytes


def raw_read(files: list[Path]) -> int:
    """Read the files front to back; return the bytes read."""
    buf = bytearray(CHUNK)
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def store_read(root: Path, order: np.ndarray, dtype: type = np.float32) -> int:
    """Every clip through FeatureStore.get, materialised (copied) as ``dtype``; return its bytes.

    ``np.float16`` (the store's dtype) is a plain copy out of the memory map: it separates
    the cost of reading from the cost of the float16 -> float32 conversion.
    """
    store = FeatureStore(root)
    total = 0
    for i in order:
        clip = store.get(int(i))
        for x in (clip.audio, clip.vision, clip.text):
            if x is not None:
                total += np.array(x, dtype=dtype).nbytes  # always a copy
    return total


def loader_read(root: Path, workers: int, batch_size: int) -> int:
    """One epoch of the trainer's DataLoader (random order); return the padded batch bytes."""
    store = FeatureStore(root)
    ds = ClipDataset(store, store.ids, np.zeros((len(store), 6), dtype=np.float32))
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
        num_workers=workers,
        collate_fn=Collator(store.dims),
    )
    total = 0
    for batch in loader:
        total += batch.audio.nbytes + batch.vision.nbytes + batch.text.nbytes
    return total


def timed(fn: Callable[[], int]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    gc.collect()  # close memory maps, so their pages can be dropped from the cache
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--store", type=Path, help="an existing store to read (nothing is written)")
    ap.add_argument(
        "--clips", type=int, default=300, help="clips of the store to build (default 300)"
    )
    ap.add_argument("--workdir", type=Path, help="build (or reuse) the store here and keep it")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--repeats", type=int, default=2, help="cold and warm repeats, best taken (default 2)"
    )
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers")
    args = ap.parse_args()

    if args.store is not None:
        run(args.store, args)
        return
    with work_folder(args.workdir, "taemi-store-read-") as base:
        root = base / f"paper_store_{args.clips}"
        if not (root / "manifest.json").exists():
            check_free_disk(
                base, expected_bytes(args.clips, 599, 400), f"a {args.clips}-clip store"
            )
        t0 = time.perf_counter()
        build_store(root, args.clips)
        print(f"store ready in {time.perf_counter() - t0:.1f} s")
        run(root, args)


def run(root: Path, args: argparse.Namespace) -> None:
    store = FeatureStore(root)
    files = data_files(store)
    n = len(store)
    nbytes = sum(p.stat().st_size for p in files)
    del store
    print(
        f"store {root}: {n} clips, {len(files)} data files, {nbytes / 1e6:.0f} MB "
        f"({nbytes / n / 1e6:.2f} MB/clip, float16)"
    )
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    rng = np.random.default_rng(0)
    paths: list[tuple[str, str, Callable[[], int]]] = [
        ("raw read", "sequential", lambda: raw_read(files)),
        ("store -> float16 copy", "sequential", lambda: store_read(root, np.arange(n), np.float16)),
        ("store -> float32", "sequential", lambda: store_read(root, np.arange(n))),
        ("store -> float32", "random", lambda: store_read(root, rng.permutation(n))),
    ]
    for w in args.workers:
        paths.append(
            (f"loader, {w} workers", "random", lambda w=w: loader_read(root, w, args.batch_size))
        )

    results = []
    for name, order, fn in paths:
        cold, res = float("inf"), []
        for _ in range(args.repeats):
            dropped = drop_from_page_cache(files)
            res.append(resident_fraction(files))
            cold = min(cold, timed(fn))
        warm = min(timed(fn) for _ in range(args.repeats))
        results.append((name, order, cold, warm))
        known = [r for r in res if r is not None]
        left = f", at most {max(known):.0%} of the bytes cached before a cold run" if known else ""
        drop = "dropped from page cache" if dropped else "page cache NOT dropped (no posix_fadvise)"
        print(f"  {name} ({order}): cold {cold:.2f} s, warm {warm:.2f} s  [{drop}{left}]")

    raw_cold, raw_warm = results[0][2], results[0][3]
    print(
        f"\n{n} clips, {nbytes / 1e6:.0f} MB; MB/s counts store bytes (float16); "
        f"x raw = speed / raw sequential read at the same temperature"
    )
    print(
        f"{'path':<22} {'order':<10} {'cold MB/s':>9} {'clips/s':>8} {'x raw':>6}   "
        f"{'warm MB/s':>9} {'clips/s':>8} {'x raw':>6}"
    )
    for name, order, cold, warm in results:
        print(
            f"{name:<22} {order:<10} {nbytes / cold / 1e6:>9.0f} {n / cold:>8.0f} {raw_cold / cold:>6.2f}   "
            f"{nbytes / warm / 1e6:>9.0f} {n / warm:>8.0f} {raw_warm / warm:>6.2f}"
        )


if __name__ == "__main__":
    main()
