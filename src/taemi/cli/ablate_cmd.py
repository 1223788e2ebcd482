"""``taemi ablate``: the paper's ablation tables over seeds (see :mod:`taemi.experiments.ablate`)."""

from __future__ import annotations

import argparse
import sys


def register(sub, common) -> None:
    sp = sub.add_parser("ablate", help="train the paper's ablation variants over seeds (resumable)")
    sp.add_argument("--store", required=True)
    sp.add_argument("--train", required=True, help="training label CSV")
    sp.add_argument("--valid", required=True, help="validation label CSV")
    sp.add_argument(
        "--out", required=True, help="experiment folder (runs/, results.csv, summary.md, plots)"
    )
    sp.add_argument("--grid", default="all", help="table3 | table4 | baselines | all")
    sp.add_argument("--seeds", type=int, default=3)
    sp.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="applied to every variant (e.g. train.max_epochs=20)",
    )
    common(sp)
    sp.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from taemi.config import parse_overrides
    from taemi.experiments.ablate import ablate

    ablate(
        args.store,
        args.train,
        args.valid,
        args.out,
        grid=args.grid,
        seeds=args.seeds,
        jobs=args.jobs,
        overrides=tuple(parse_overrides(args.set or [])),
    )
    with open(f"{args.out}/summary.md", encoding="utf-8") as fh:
        sys.stdout.write(fh.read())
    sys.stdout.write(
        f"results: {args.out}/results.csv, plots: {args.out}/ablation.png, {args.out}/per_emotion_heatmap.png\n"
    )
    return 0
