"""Does the input pipeline starve training? Time blocked on the DataLoader vs step time.

The training loop's pattern over a memory-mapped paper-dimension store (float16, the
corpus's length mix, built with ``_paper_store.build_store(mix="abaw")``; no full-dataset
load: ``ClipDataset`` reads clips through the store's memory maps):
``DataLoader(ClipDataset, batch_sampler=LengthBucketBatchSampler(dataset_lengths(...)),
collate_fn=Collator)`` feeding the trainer's step (paper preset, bf16 autocast by default:
the fastest step, so the hardest case for the loader).

For each loader setting (``--settings``: ``W`` = num_workers W with the default prefetch,
``WxP`` = prefetch_factor P), the store's pages are dropped from the page cache first
(cold reads), a fresh loader is made (worker start-up is in the first wait), and for
``--steps`` steps the script times the wait in ``next(loader)`` and the step. Reported:
the wait's share of the loop time, excluding and including the first batch, and the
mean step time (workers compete with the model for the same cores).

Usage::

    python benchmarks/loader_wait.py                          # 1,000 clips (~1 GB in a temp dir), ~6 min
    python benchmarks/loader_wait.py --workdir /work/tmp-bench --settings 0 1 2 1x4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _paper_store import (
    build_store,
    check_free_disk,
    data_files,
    drop_from_page_cache,
    expected_bytes,
    work_folder,
)
from torch.utils.data import DataLoader

from taemi.config import build_config
from taemi.data.dataset import ClipDataset, Collator
from taemi.data.sampler import LengthBucketBatchSampler, dataset_lengths, padding_fraction
from taemi.runtime import autocast
from taemi.store import FeatureStore
from taemi.train.modes import build_model


def parse_setting(s: str) -> tuple[int, int | None]:
    w, _, p = s.partition("x")
    return int(w), (int(p) if p else None)


def measure(
    store: FeatureStore, setting: str, args: argparse.Namespace, model, optimizer, cfg
) -> dict:
    workers, prefetch = parse_setting(setting)
    ds = ClipDataset(
        store, store.ids, np.random.default_rng(0).random((len(store), 6), dtype=np.float32)
    )
    lengths = dataset_lengths(store, store.ids, ds.max_audio_len, ds.max_vision_len)
    sampler = LengthBucketBatchSampler(lengths, args.batch_size, seed=3407, epoch=1)
    kw = {"prefetch_factor": prefetch} if workers and prefetch else {}
    drop_from_page_cache(data_files(store))
    loader = DataLoader(
        ds, batch_sampler=sampler, num_workers=workers, collate_fn=Collator(store.dims), **kw
    )
    device = torch.device("cpu")
    waits, steps, groups = [], [], []
    it = iter(loader)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        with autocast(device, args.precision):
            pred = model(batch)
        loss = F.mse_loss(pred.float(), batch.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 100.0)
        optimizer.step()
        loss.item()
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        steps.append(t2 - t1)
        groups.append([store.index(i) for i in batch.ids])
    del it, loader
    later = sum(waits[1:]) / (sum(waits[1:]) + sum(steps[1:]))
    return {
        "setting": setting,
        "workers": workers,
        "prefetch": prefetch if workers else None,
        "first_wait": waits[0],
        "wait_share": later,
        "wait_share_all": sum(waits) / (sum(waits) + sum(steps)),
        "wait_median_ms": statistics.median(waits[1:]) * 1e3,
        "step_mean": statistics.mean(steps[1:]),
        "padding": padding_fraction(groups, lengths),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, help="build (or reuse) the store here and keep it")
    ap.add_argument("--settings", nargs="+", default=["0", "1", "2", "1x4"], help="W or WxPREFETCH")
    ap.add_argument(
        "--steps", type=int, default=8, help="steps per setting (the first one counted apart)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    args = ap.parse_args()

    with work_folder(args.workdir, "taemi-loader-wait-") as base:
        root = base / f"paper_store_abaw_{args.clips}"
        if not (root / "manifest.json").exists():
            check_free_disk(
                base, expected_bytes(args.clips, 599, 400, mix="abaw"), f"a {args.clips}-clip store"
            )
        t0 = time.perf_counter()
        store = build_store(root, args.clips, mix="abaw")
        nbytes = sum(p.stat().st_size for p in data_files(store))
        print(
            f"store {root}: {len(store)} clips, {nbytes / 1e9:.2f} GB float16 (built/opened in "
            f"{time.perf_counter() - t0:.0f} s)"
        )
        print(
            f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
            f"{args.preset} preset, {args.precision}, batch {args.batch_size}, {args.steps} steps per setting; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        cfg = build_config(args.preset)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        results = [measure(store, s, args, model, optimizer, cfg) for s in args.settings]

    print(
        f"\n{'setting':<8} {'workers':>7} {'prefetch':>8} {'1st wait s':>10} {'wait share':>10} "
        f"{'incl. 1st':>9} {'median wait ms':>14} {'step s':>7} {'padding':>7}"
    )
    for r in results:
        print(
            f"{r['setting']:<8} {r['workers']:>7} {r['prefetch'] or '-'!s:>8} {r['first_wait']:>10.2f} "
            f"{r['wait_share']:>10.1%} {r['wait_share_all']:>9.1%} {r['wait_median_ms']:>14.1f} "
            f"{r['step_mean']:>7.2f} {r['padding']:>7.1%}"
        )
    base_r = results[0]
    for r in results[1:]:
        print(
            f"  {r['setting']} vs {base_r['setting']}: step time {r['step_mean'] / base_r['step_mean']:.2f}x, "
            f"wait share {r['wait_share']:.1%} vs {base_r['wait_share']:.1%}"
        )


if __name__ == "__main__":
    main()
