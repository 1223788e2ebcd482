"""Peak memory of training over a feature store must not grow with the number of clips in it.

Builds (or reuses, with ``--workdir``) paper-dimension float16 stores of each ``--clips``
size (``--mix abaw``, the default: the corpus's length mix of
``taemi.data.sampler.abaw_like_lengths``, ~0.95 MB per clip; ``--mix uniform``: T_a uniform
300..599 x 1027, T_v 200..400 x 768, ~1.4 MB per clip; text 768, N(0, 1) values), then, in
a fresh child process per store (so peaks do not mix), trains for the same bounded number
of steps: ``ClipDataset`` -> ``DataLoader`` (``--sampler bucket``, the default: the
``LengthBucketBatchSampler`` over ``dataset_lengths`` read from the store index; or
``random``; ``num_workers=0``, batch 32, the trainer's ``Collator``) -> forward/backward/
AdamW of a small model (``official`` preset with ``hidden=64``: the claim is about data
memory, the model only has to consume it).

Reported per store, from ``/proc/self/status`` of the child (sampled every 5 ms by a thread,
plus the kernel's own high-water mark):

- peak RssAnon: anonymous memory (heap, tensors, index arrays). THIS must stay flat: it is
  what the process really holds;
- peak RssFile: file-backed pages mapped by the process: the shared libraries (torch's are
  ~100 MiB, shown as "before") plus the pages of the memory-mapped store touched so far.
  The latter grow with the clips READ (the same here for both stores), not with the clips
  in the store, and are page cache the kernel can reclaim at any time;
- VmHWM: the kernel's peak of RSS = RssAnon + RssFile (+ shared), for reference;
- the anonymous memory the opened store and dataset add (their per-clip index), which
  does grow with the clip count, by a few hundred bytes per clip.

The default, 1,000 vs 4,000 clips, writes ~5 GB and takes ~3 minutes on 2 cores. The
paper-scale comparison (17,000 clips, ~16 GB with the abaw mix, ~24 GB uniform) is::

    python benchmarks/train_memory.py --clips 1000 17000 --workdir /big/disk/taemi-bench

Stores in ``--workdir`` are kept and reused; without it they go to a temporary directory
that is deleted at the end. Free disk space is checked first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _paper_store import (
    PeakSampler,
    build_store,
    check_free_disk,
    expected_bytes,
    proc_status,
    work_folder,
)

MiB = 1 << 20


# --------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> None:
    """Train ``args.steps`` steps over the store ``args.child``; print one JSON line."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, RandomSampler

    from taemi.config import build_config
    from taemi.data.dataset import ClipDataset, Collator
    from taemi.data.sampler import LengthBucketBatchSampler, dataset_lengths
    from taemi.store import FeatureStore
    from taemi.train.modes import build_model

    torch.manual_seed(0)
    cfg = build_config("official", [("model.hidden", args.hidden)])
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    before_store = proc_status()

    store = FeatureStore(args.child)
    targets = np.random.default_rng(0).random(
        (len(store), len(cfg.data.emotions)), dtype=np.float32
    )
    ds = ClipDataset(
        store,
        store.ids,
        targets,
        max_audio_len=args.max_audio_len,
        max_vision_len=args.max_vision_len,
    )
    if args.sampler == "bucket":
        lengths = dataset_lengths(
            store, store.ids, args.max_audio_len, args.max_vision_len
        )  # (N, 2)
        batches = LengthBucketBatchSampler(lengths, args.batch_size, seed=0)
        loader = DataLoader(
            ds, batch_sampler=batches, num_workers=0, collate_fn=Collator(store.dims)
        )
    else:
        loader = DataLoader(
            ds,
            batch_size=args.batch_size,
            sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
            num_workers=0,
            collate_fn=Collator(store.dims),
        )
    after_store = proc_status()

    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    steps = clips = 0
    for batch in loader:
        pred = model(batch)  # (B, E)
        loss = F.mse_loss(pred.float(), batch.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        loss.item()
        steps += 1
        clips += len(batch)
        del batch, pred, loss
        if steps == args.steps:
            break
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    end = proc_status()
    result = {
        "clips_in_store": len(store),
        "steps": steps,
        "clips_read": clips,
        "seconds": seconds,
        "peak_anon": peak["RssAnon"],
        "peak_file": peak["RssFile"],
        "vm_hwm": end["VmHWM"],
        "anon_before_store": before_store["RssAnon"],
        "file_before_store": before_store["RssFile"],
        "store_anon": after_store["RssAnon"] - before_store["RssAnon"],
        "store_bytes": sum(p.stat().st_size for p in Path(args.child).rglob("*.bin")),
    }
    print(json.dumps(result))


# --------------------------------------------------------------------------- parent


def measure(store: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(store),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--hidden",
        str(args.hidden),
        "--max-audio-len",
        str(args.max_audio_len),
        "--max-vision-len",
        str(args.max_vision_len),
        "--sampler",
        args.sampler,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(
            f"the measuring child failed for {store} (exit {res.returncode}):\n{res.stderr}"
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--clips", type=int, nargs="+", default=[1000, 4000], help="store sizes to compare"
    )
    ap.add_argument(
        "--max-audio-len", type=int, default=599, help="longest audio clip (frames); also the trim"
    )
    ap.add_argument(
        "--max-vision-len",
        type=int,
        default=400,
        help="longest vision clip (frames); also the trim",
    )
    ap.add_argument("--steps", type=int, default=25, help="training steps per store (same for all)")
    ap.add_argument(
        "--mix", choices=["abaw", "uniform"], default="abaw", help="clip length mix of the stores"
    )
    ap.add_argument("--sampler", choices=["bucket", "random"], default="bucket", help="batch order")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64, help="model.hidden of the official preset")
    ap.add_argument("--workdir", type=Path, help="build (or reuse) the stores here and keep them")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args)
        return
    if min(args.clips) < args.steps * args.batch_size:
        print(
            f"note: the smallest store ({min(args.clips)} clips) has fewer clips than "
            f"--steps x --batch-size = {args.steps * args.batch_size}; its run stops after one epoch"
        )

    with work_folder(args.workdir, "taemi-train-memory-") as base:
        tag = "" if args.mix == "uniform" else f"_{args.mix}"
        roots = {
            n: base / f"paper_store{tag}_{n}_a{args.max_audio_len}_v{args.max_vision_len}"
            for n in args.clips
        }
        need = sum(
            expected_bytes(n, args.max_audio_len, args.max_vision_len, mix=args.mix)
            for n, r in roots.items()
            if not (r / "manifest.json").exists()
        )
        check_free_disk(base, need, f"stores of {', '.join(map(str, args.clips))} clips")
        for n, root in roots.items():
            t0 = time.perf_counter()
            build_store(
                root,
                n,
                max_audio_len=args.max_audio_len,
                max_vision_len=args.max_vision_len,
                mix=args.mix,
            )
            print(f"store of {n} clips ready in {time.perf_counter() - t0:.0f} s")
        results = [measure(root, args) for root in roots.values()]
    report(results, args)


def report(results: list[dict], args: argparse.Namespace) -> None:
    import torch

    print(
        f"\ntorch {torch.__version__}; {args.steps} steps of batch {args.batch_size} per store, "
        f"{args.sampler} batches, {args.mix} length mix, num_workers=0, official preset hidden "
        f"{args.hidden}; one child process per store"
    )
    rows = [
        ("store size (GB on disk)", lambda r: f"{r['store_bytes'] / 1e9:.2f}", "store_bytes"),
        ("clips read", lambda r: f"{r['clips_read']}", "clips_read"),
        ("peak RssAnon (MiB)", lambda r: f"{r['peak_anon'] / MiB:.0f}", "peak_anon"),
        (
            "  of which before store open",
            lambda r: f"{r['anon_before_store'] / MiB:.0f}",
            "anon_before_store",
        ),
        ("  added by store + dataset", lambda r: f"{r['store_anon'] / MiB:.1f}", "store_anon"),
        ("peak RssFile (MiB)", lambda r: f"{r['peak_file'] / MiB:.0f}", "peak_file"),
        (
            "  of which libraries (before)",
            lambda r: f"{r['file_before_store'] / MiB:.0f}",
            "file_before_store",
        ),
        ("VmHWM, peak RSS (MiB)", lambda r: f"{r['vm_hwm'] / MiB:.0f}", "vm_hwm"),
        ("seconds training", lambda r: f"{r['seconds']:.1f}", "seconds"),
    ]
    first = results[0]
    head = f"{'':<30}" + "".join(f"{str(r['clips_in_store']) + ' clips':>14}" for r in results)
    head += "".join(
        f"{'ratio ' + str(r['clips_in_store']) + '/' + str(first['clips_in_store']):>16}"
        for r in results[1:]
    )
    print(head)
    for label, fmt, key in rows:
        line = f"{label:<30}" + "".join(f"{fmt(r):>14}" for r in results)
        line += "".join(
            f"{r[key] / first[key] if first[key] else float('nan'):>16.3f}" for r in results[1:]
        )
        print(line)
    for r in results[1:]:
        grow = (r["peak_anon"] - first["peak_anon"]) / MiB
        clips_ratio = r["clips_in_store"] / first["clips_in_store"]
        per_clip = (r["store_anon"] - first["store_anon"]) / (
            r["clips_in_store"] - first["clips_in_store"]
        )
        verdict = (
            "flat (within 10%)" if abs(r["peak_anon"] / first["peak_anon"] - 1) <= 0.10 else "GROWS"
        )
        print(
            f"{clips_ratio:.1f}x the clips: peak RssAnon {grow:+.0f} MiB "
            f"({r['peak_anon'] / first['peak_anon'] - 1:+.1%}) -> {verdict}; the index costs "
            f"~{per_clip:.0f} bytes of anonymous memory per extra clip"
        )


if __name__ == "__main__":
    main()
