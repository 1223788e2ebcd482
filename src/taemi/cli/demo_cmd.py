"""``taemi demo``: generated media -> extract -> train -> evaluate -> predict (see :mod:`taemi.demo`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from taemi.cli.common import metrics_table, print_line


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "demo", help="the main job: generated media -> extract -> train -> evaluate -> predict"
    )
    sp.add_argument("--out", default="demo", help="output folder (default: ./demo)")
    sp.add_argument(
        "--clips", type=int, default=720, help="generated clips, 3/4 train, 1/4 valid (720)"
    )
    sp.add_argument("--epochs", type=int, default=30)
    sp.add_argument("--preset", default="paper")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--max-frames", type=int, default=8, help="video frames per clip (uniform policy)"
    )
    sp.add_argument(
        "--synthetic-features",
        action="store_true",
        help="skip media: train on a synthetic feature store at paper sizes",
    )
    sp.add_argument(
        "--exact",
        action="store_true",
        help="extract on the exact path (fp32 DINOv2, Whisper's 30 s window, two Whisper "
        "passes) instead of the demo's speed settings",
    )
    sp.add_argument(
        "--share-whisper",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="extraction: transcripts from the audio features' Whisper pass (taemi extract "
        "--share-whisper; the demo's default, off with --exact)",
    )
    sp.add_argument(
        "--image-precision",
        default=None,
        choices=("fp32", "int8"),
        help="extraction: DINOv2 in fp32 (exact) or int8 (taemi extract --image-precision; "
        "the demo's default: int8, fp32 with --exact)",
    )
    sp.add_argument(
        "--whisper-window",
        type=float,
        default=None,
        metavar="S",
        help="extraction: Whisper audio window in seconds (taemi extract --whisper-window; "
        "the demo's default: 10, 30 with --exact)",
    )
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training config setting over the preset (as taemi train --set; repeatable)",
    )
    sp.add_argument("--resume", action="store_true", help="reuse finished steps in --out")
    common(sp)
    sp.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from taemi.config import parse_overrides
    from taemi.demo import EXACT_EXTRACTION, FAST_EXTRACTION, run_demo

    overrides = parse_overrides(args.set)  # a bad --set fails before any work
    base = EXACT_EXTRACTION if args.exact else FAST_EXTRACTION
    given = {
        "share_whisper": args.share_whisper,
        "image_precision": args.image_precision,
        "whisper_window": args.whisper_window,
    }
    extraction = {k: base[k] if v is None else v for k, v in given.items()}
    s = run_demo(
        args.out,
        clips=args.clips,
        epochs=args.epochs,
        preset=args.preset,
        seed=args.seed,
        max_frames=args.max_frames,
        synthetic_features=args.synthetic_features,
        resume=args.resume,
        progress=not args.no_progress,
        overrides=overrides,
        **extraction,
    )
    sets = " ".join(f"{k}={v}" for k, v in s["settings"]["overrides"].items())
    print_line(
        metrics_table(s["valid"], f"{args.preset} preset ({sets}), {s['data']}, valid split:")
    )
    print_line(
        f"valid mean Pearson {s['valid']['mean_pearson']:.4f} vs oracle ceiling {s['oracle_mean_pearson']:.4f} "
        f"({100 * s['share_of_oracle']:.0f}% of the ceiling); details in {Path(args.out) / 'summary.json'}"
    )
    if s.get("longest_phase"):
        print_line(
            "seconds: "
            + ", ".join(f"{k} {v:g}" for k, v in s["seconds"].items())
            + f"; the longest phase: {s['longest_phase']}"
        )
    for line in s.get("limits", []):
        print_line(f"limits, {line}")
    return 0
