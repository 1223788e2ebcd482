"""``taemi train`` end to end, several configurations side by side in one run: the whole
run (set-up, every epoch with its validation and checkpoints, the end), not just the step.

Data: ONE float16 paper-dimension store (1027 / 768 / 768) of ``--train-clips`` +
``--valid-clips`` clips with the corpus's length mix (``_paper_store.build_store(mix="abaw")``:
audio mean 6.9 s / p95 11.5 s, some clips without audio or face), reused when ``--workdir``
holds it. Labels: the first ``--train-clips`` ids train, the next ``--valid-clips``
validate. ``--targets random`` (default): uniform in [0, 1], seeded; nothing to learn, so
the valid Pearson stays near 0 (it is printed to show the run worked, not how well).
``--targets text``: a fixed random linear function of each clip's text vector through a
sigmoid, learnable, so a configuration that breaks learning shows a Pearson clearly below
the others (reads every clip once to build them).

Before the configurations: the store's data files are read once (the page cache is warm
for every configuration alike; ``--no-warm`` skips it) and, on CUDA, the context and cuBLAS
are initialised, then an untimed 1-epoch run of the first configuration on 64 train / 32
valid clips pays the process's one-time costs (lazy imports, first calls, CUDA kernel
loading), which would otherwise land in the first configuration's start-up and first epoch
only (``--no-warmup`` skips it; its time is printed: a user's ``taemi train`` pays it too).

Configurations (``--variants NAME:key=value,key=value ...``, ``NAME:`` = no overrides): each
is the preset + ``--set`` (all of them) + its own overrides + ``train.max_epochs=--epochs``,
``train.patience=0`` (every epoch runs), ``train.device=--device``, and is trained by
``taemi.train.trainer.train`` in this process into its own run folder (deleted first if a
previous run left it). Defaults: ``default:`` (what a user gets), ``bucket:data.batching=bucket``
and ``fp32_eager:train.precision=fp32,train.cuda_graphs=off,data.resident=no``. One that fails
is reported and the others still run.

Timing: the trainer's ``_train_epoch`` and ``predict_dataset`` (validation) are wrapped
with timers (both return host values, so the device has finished when they return); when
the trainer no longer calls them by those names the columns they feed fall back to the
epoch callback's ``row["seconds"]`` or read "n/a". Printed per configuration:

- ``start s``: from calling ``train()`` to the first epoch's start (config checks, model
  build, moving it and the data to the device, the run folder);
- ``ep1 s``: the first epoch, training + validation (``row["seconds"]``: CUDA graph capture,
  autotuning and other first-time costs land here);
- ``epoch s``: median of the later epochs' ``row["seconds"]`` (training + validation; the
  first epoch's when only one ran), ``valid s``: the median validation time over those
  epochs, ``save s``: median time from an epoch's end to its callback (checkpoints,
  ``state.pt``, history, metrics);
- ``samples/s``: training clips / median training time of those epochs (validation excluded);
- ``end s``: from the last epoch's callback to ``train()`` returning (final metrics, plots);
- ``50 ep min``: projected run of 50 epochs: start + first epoch + 49 x the later epochs'
  median (with its save) + end;
- ``total s``: the whole measured run, ``pearson``: the final epoch's valid mean Pearson,
  ``prec``: the precision the run resolved (``metrics.json``), ``peak GB``: peak CUDA memory
  allocated;
- then, as-is, anything ``metrics.json`` records about the run's execution (its
  ``"execution"`` or ``"speed"`` entries), and the ratios against ``fp32_eager`` when it ran.

Each configuration's epochs and result are printed as they finish (a run cut by a time
limit keeps what it measured); ``--json PATH`` writes the whole summary.

Usage::

    python benchmarks/train_e2e.py --device cpu --train-clips 64 --valid-clips 32 --epochs 2 --preset official  # ~30 s on 2 cores
    python benchmarks/train_e2e.py --device cuda --train-clips 8072 --valid-clips 1000 --epochs 5 \\
        --workdir /tmp/e2e --json /tmp/e2e/summary.json                       # ~9 GB store
    python benchmarks/train_e2e.py --device cuda --variants default: bf16:train.precision=bf16 \\
        fp32_eager:train.precision=fp32,train.cuda_graphs=off,data.resident=no --set data.num_workers=4
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _paper_store import (
    build_store,
    check_free_disk,
    data_files,
    expected_bytes,
    work_folder,
)

from taemi.config import parse_overrides
from taemi.data.labels import read_labels
from taemi.store import FeatureStore
from taemi.train import trainer
from taemi.train.modes import config_for_store

DEFAULT_VARIANTS = (
    "default:",
    "bucket:data.batching=bucket",
    "fp32_eager:train.precision=fp32,train.cuda_graphs=off,data.resident=no",
)
BASELINE = "fp32_eager"
#: ``metrics.json`` entries printed as-is (what the trainer records about its execution).
EXECUTION_KEYS = ("execution", "speed")


def parse_variant(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """``NAME:key=value,key=value`` -> (NAME, overrides); ``NAME:`` has none."""
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variants {spec!r}: expected NAME:key=value,... (NAME: for none)")
    items = [s for s in rest.split(",") if s.strip()]
    return name, parse_overrides(items)


# --------------------------------------------------------------------------- data


def write_labels(path: Path, ids: list[str], emotions: tuple[str, ...], values: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["Filename", *emotions])
        for cid, row in zip(ids, values):
            w.writerow([cid, *(f"{v:.6f}" for v in row)])


def make_targets(store: FeatureStore, n: int, n_emotions: int, kind: str, seed: int) -> np.ndarray:
    """(n, E) targets in [0, 1] for the store's first ``n`` clips."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.uniform(0.0, 1.0, (n, n_emotions))
    w = rng.standard_normal((store.dims["text"], n_emotions)) / np.sqrt(store.dims["text"])
    out = np.full((n, n_emotions), 0.5)
    for i in range(n):
        text = store.get(i).text
        if text is not None:  # a clip without text keeps 0.5
            out[i] = 1.0 / (1.0 + np.exp(-2.0 * (text.astype(np.float64) @ w)))
    return out


def warm_page_cache(store: FeatureStore) -> tuple[float, float]:
    """Read every data file once: (GB read, seconds)."""
    t0, total = time.perf_counter(), 0
    for p in data_files(store):
        with open(p, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total / 1e9, time.perf_counter() - t0


# --------------------------------------------------------------------------- timing


class Timer:
    """Times the trainer's epoch parts by wrapping its module-level functions."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.t_call = 0.0
        self.epoch_start: list[float] = []
        self.train_s: list[float] = []
        self.valid_s: list[float] = []
        self.callback_at: list[float] = []
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        saved = {}
        for name, wrap in (
            ("_train_epoch", self._wrap_train),
            ("predict_dataset", self._wrap_valid),
        ):
            fn = getattr(trainer, name, None)
            if callable(fn):
                saved[name] = fn
                setattr(trainer, name, wrap(fn))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(trainer, name, fn)

    def _wrap_train(self, fn):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            self.epoch_start.append(t0)
            out = fn(*a, **kw)
            self.train_s.append(time.perf_counter() - t0)
            return out

        return wrapped

    def _wrap_valid(self, fn):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.valid_s.append(time.perf_counter() - t0)
            return out

        return wrapped

    def callback(self, epoch: int, row: dict) -> None:
        self.callback_at.append(time.perf_counter())
        self.rows.append(dict(row))
        k = len(self.rows) - 1
        if self.quiet:
            return
        v = self.valid_s[k] if k < len(self.valid_s) else None
        print(
            f"    epoch {epoch}: {row.get('seconds', float('nan')):.2f} s"
            + (f" (valid {v:.2f} s)" if v is not None else "")
            + f", train loss {row.get('train_loss', float('nan')):.4f}"
            + (
                f", valid mean Pearson {row['valid_mean_pearson']:.4f}"
                if "valid_mean_pearson" in row
                else ""
            ),
            flush=True,
        )


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(t: Timer, t_return: float, train_clips: int) -> dict:
    """The columns of one configuration from its timer (see the module docstring)."""
    n = len(t.rows)
    secs = [float(r["seconds"]) for r in t.rows]
    hooked = len(t.epoch_start) >= n > 0
    if hooked:
        startup = t.epoch_start[0] - t.t_call
        full = [t.callback_at[k] - t.epoch_start[k] for k in range(n)]  # epoch + its saving
        save = [full[k] - secs[k] for k in range(n)]
    else:  # the callback's arrival minus the epoch: start-up then includes the first save
        startup = t.callback_at[0] - secs[0] - t.t_call if n else None
        full = [secs[0]] + [t.callback_at[k] - t.callback_at[k - 1] for k in range(1, n)]
        save = []
    later = slice(1, None) if n > 1 else slice(0, None)
    train_s = t.train_s[:n] if len(t.train_s) >= n else []
    valid_s = t.valid_s[:n] if len(t.valid_s) >= n else []
    epoch_med = _median(secs[later])
    full_med = _median(full[later])
    train_med = _median(train_s[later]) if train_s else None
    if train_med is None and valid_s and epoch_med is not None:
        train_med = epoch_med - _median(valid_s[later])
    end = t_return - t.callback_at[-1] if n else None
    proj = None
    if n and startup is not None and full_med is not None:
        proj = startup + full[0] + 49 * full_med + end
    last = t.rows[-1] if n else {}
    return {
        "epochs_run": n,
        "startup_s": startup,
        "epoch1_s": secs[0] if n else None,
        "epoch_s": epoch_med,
        "epoch_s_all": secs,
        "valid_s": _median(valid_s[later]) if valid_s else None,
        "valid_s_all": valid_s,
        "train_s_all": train_s,
        "save_s": _median(save[later]) if save else None,
        "samples_per_s": train_clips / train_med if train_med else None,
        "end_s": end,
        "projected_50_epochs_s": proj,
        "total_s": t_return - t.t_call,
        "final_valid_mean_pearson": last.get("valid_mean_pearson"),
    }


# --------------------------------------------------------------------------- one configuration


def run_variant(
    name: str,
    overrides: list[tuple[str, str]],
    args: argparse.Namespace,
    store: FeatureStore,
    labels: tuple,
    runs: Path,
    *,
    quiet: bool = False,
) -> dict:
    out = runs / name
    if out.exists():
        shutil.rmtree(out)  # this script's own folder from an earlier invocation
    fixed = [
        ("train.device", args.device),
        ("train.max_epochs", str(args.epochs)),
        ("train.patience", "0"),
    ]
    all_overrides = [*fixed, *parse_overrides(args.set), *overrides]
    result: dict = {"name": name, "overrides": [f"{k}={v}" for k, v in overrides]}
    if not quiet:
        print(f"\n== {name}: {' '.join(result['overrides']) or '(no overrides)'}", flush=True)
    cuda = torch.cuda.is_available() and args.device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = Timer(quiet)
    try:
        cfg = config_for_store(args.preset, all_overrides, store)
        with timer.patched():
            timer.t_call = time.perf_counter()
            res = trainer.train(
                cfg,
                store,
                labels[0],
                labels[1],
                out,
                progress=False,
                callbacks=[timer.callback],
            )
            t_return = time.perf_counter()
        result.update(summarise(timer, t_return, len(labels[0])))
        result["best_epoch"] = res.best_epoch
    except Exception as exc:  # noqa: BLE001 - one failing configuration must not stop the others
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
        if timer.rows:
            result.update(summarise(timer, time.perf_counter(), len(labels[0])))
    if cuda:
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        result["precision"] = m.get("precision")
        result["metrics_device"] = m.get("device")
        for k in EXECUTION_KEYS:
            if k in m:
                result[k] = m[k]
    if not quiet:
        print(f"   {name}: " + _one_line(result), flush=True)
    return result


def _fmt(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _one_line(r: dict) -> str:
    if "error" in r and not r.get("epochs_run"):
        return f"FAILED: {r['error']}"
    return (
        f"start {_fmt(r.get('startup_s'))} s, epoch {_fmt(r.get('epoch_s'))} s "
        f"(valid {_fmt(r.get('valid_s'))} s), {_fmt(r.get('samples_per_s'), '.0f')} samples/s, "
        f"total {_fmt(r.get('total_s'), '.1f')} s"
        + (f"; FAILED after {r['epochs_run']} epochs: {r['error']}" if "error" in r else "")
    )


# --------------------------------------------------------------------------- report


COLUMNS = (  # header, key, width, format (projected 50 epochs in minutes)
    ("config", "name", 14, "s"),
    ("start s", "startup_s", 8, ".2f"),
    ("ep1 s", "epoch1_s", 8, ".2f"),
    ("epoch s", "epoch_s", 8, ".2f"),
    ("valid s", "valid_s", 8, ".2f"),
    ("save s", "save_s", 7, ".2f"),
    ("samples/s", "samples_per_s", 10, ".0f"),
    ("end s", "end_s", 7, ".2f"),
    ("50 ep min", "projected_50_epochs_min", 10, ".1f"),
    ("total s", "total_s", 8, ".1f"),
    ("pearson", "final_valid_mean_pearson", 8, ".4f"),
    ("prec", "precision", 5, "s"),
    ("peak GB", "peak_gb", 8, ".2f"),
)


def print_table(results: list[dict]) -> None:
    print(
        "\n" + " ".join(h.rjust(w) if i else h.ljust(w) for i, (h, _, w, _) in enumerate(COLUMNS))
    )
    for r in results:
        r = dict(r)
        p = r.get("projected_50_epochs_s")
        r["projected_50_epochs_min"] = None if p is None else p / 60
        cells = []
        for i, (_, key, w, spec) in enumerate(COLUMNS):
            v = r.get(key)
            s = "n/a" if v is None else format(v, spec) if spec != "s" else str(v)
            cells.append(s.ljust(w) if i == 0 else s.rjust(w))
        line = " ".join(cells)
        if "error" in r:
            line += f"  FAILED{' after ' + str(r['epochs_run']) + ' epochs' if r.get('epochs_run') else ''}: {r['error'][:120]}"
        print(line)
    for r in results:
        for k in EXECUTION_KEYS:
            if k in r:
                print(f"{r['name']} metrics.json {k}: {json.dumps(r[k], sort_keys=True)}")
    base = next((r for r in results if r["name"] == BASELINE and r.get("epoch_s")), None)
    if base is None:
        return
    parts = []
    for r in results:
        if r is base or not r.get("epoch_s"):
            continue
        s = f"{r['name']} {base['epoch_s'] / r['epoch_s']:.2f}x faster per epoch"
        if r.get("projected_50_epochs_s") and base.get("projected_50_epochs_s"):
            s += f" ({base['projected_50_epochs_s'] / r['projected_50_epochs_s']:.2f}x over 50 epochs)"
        parts.append(s)
    if parts:
        print(f"against {BASELINE}: " + "; ".join(parts))


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--train-clips", type=int, default=8072)
    ap.add_argument("--valid-clips", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--preset", default="paper")
    ap.add_argument(
        "--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME:key=value,..."
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="for every configuration"
    )
    ap.add_argument("--targets", choices=("random", "text"), default="random")
    ap.add_argument("--seed", type=int, default=0, help="of the targets")
    ap.add_argument("--workdir", type=Path, help="keep the store (and runs) here; reused")
    ap.add_argument("--no-warm", action="store_true", help="do not read the store once first")
    ap.add_argument(
        "--no-warmup", action="store_true", help="no untimed 1-epoch run before the configurations"
    )
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--verbose", action="store_true", help="the trainer's log lines")
    args = ap.parse_args()
    if args.train_clips < 1 or args.valid_clips < 2 or args.epochs < 1:
        raise SystemExit("need --train-clips >= 1, --valid-clips >= 2, --epochs >= 1")
    variants = [parse_variant(v) for v in args.variants]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variants: repeated names in {names}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if "OMP_NUM_THREADS" not in os.environ:  # as `taemi train` does
        from taemi.runtime import configure_threads

        configure_threads()

    dev_name = "cpu"
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        dev_name = torch.cuda.get_device_name(torch.device(args.device))
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {args.device}: {dev_name}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads"
    )
    summary: dict = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": args.device,
        "device_name": dev_name,
        "preset": args.preset,
        "train_clips": args.train_clips,
        "valid_clips": args.valid_clips,
        "epochs": args.epochs,
        "targets": args.targets,
        "set": args.set,
        "variants": [],
    }
    n = args.train_clips + args.valid_clips
    with work_folder(args.workdir, "taemi_e2e_") as work:
        root = work / "store"
        if not (root / "manifest.json").exists():
            check_free_disk(work, expected_bytes(n, 599, 400, mix="abaw"), "the store")
        t0 = time.perf_counter()
        store = build_store(root, n, mix="abaw")
        build_s = time.perf_counter() - t0
        size_gb = sum(p.stat().st_size for p in data_files(store)) / 1e9
        print(f"store {root}: {n} clips, {size_gb:.2f} GB, built or reused in {build_s:.1f} s")
        summary.update(store_gb=size_gb, store_build_s=build_s)
        if not args.no_warm:
            gb, s = warm_page_cache(store)
            print(f"read the store once (page cache): {gb:.2f} GB in {s:.1f} s")
            summary["warm_read_s"] = s
        if args.device.startswith("cuda"):
            t0 = time.perf_counter()
            x = torch.ones(256, 256, device=args.device)
            (x @ x).sum().item()
            summary["cuda_init_s"] = time.perf_counter() - t0
            print(f"CUDA context + cuBLAS: {summary['cuda_init_s']:.1f} s")

        base_cfg = config_for_store(args.preset, [], store)
        emotions = tuple(base_cfg.data.emotions)
        ids = list(store.ids)
        t0 = time.perf_counter()
        values = make_targets(store, n, len(emotions), args.targets, args.seed)
        write_labels(
            work / "train.csv", ids[: args.train_clips], emotions, values[: args.train_clips]
        )
        write_labels(
            work / "valid.csv", ids[args.train_clips :], emotions, values[args.train_clips :]
        )
        kw = {"emotions": emotions, "id_column": base_cfg.data.id_column, "store_ids": store}
        labels = (read_labels(work / "train.csv", **kw), read_labels(work / "valid.csv", **kw))
        print(f"labels ({args.targets} targets): {time.perf_counter() - t0:.1f} s")

        if not args.no_warmup:  # imports and first-call costs, paid once per process
            t0 = time.perf_counter()
            warm = run_variant(
                "warmup",
                variants[0][1] + [("train.max_epochs", "1")],
                args,
                store,
                (
                    labels[0].subset(ids[: min(64, args.train_clips)]),
                    labels[1].subset(ids[args.train_clips : args.train_clips + 32]),
                ),
                work / "runs",
                quiet=True,
            )
            summary["warmup_s"] = time.perf_counter() - t0
            print(
                f"warm-up run (untimed, {variants[0][0]}'s config, 1 epoch): {summary['warmup_s']:.1f} s"
                + (f", FAILED: {warm['error']}" if "error" in warm else "")
            )

        for name, overrides in variants:
            summary["variants"].append(
                run_variant(name, overrides, args, store, labels, work / "runs")
            )
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(summary, indent=2))

    print(
        f"\n[{args.preset}] {args.train_clips} train + {args.valid_clips} valid clips, "
        f"{args.epochs} epochs, {args.device} ({dev_name}), store {size_gb:.2f} GB"
    )
    print_table(summary["variants"])
    if args.json:
        print(f"summary: {args.json}")
    if any("error" in r for r in summary["variants"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
