"""``taemi synth``: a synthetic feature store and label files (see :mod:`taemi.synth.features`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from taemi.cli.common import print_line


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser("synth", help="write a synthetic feature store and label files")
    sp.add_argument(
        "--out", required=True, help="output folder (store/, train.csv, valid.csv, synth.json)"
    )
    sp.add_argument("--clips", type=int, default=1000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="SynthConfig field, e.g. dims=64,48,32"
    )
    common(sp)
    sp.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from taemi.config import apply_override, parse_overrides
    from taemi.synth.features import SynthConfig, make_synth

    cfg = SynthConfig(clips=args.clips, seed=args.seed)
    for k, v in parse_overrides(args.set or []):
        apply_override(cfg, k, v)
    res = make_synth(args.out, cfg, progress=not args.no_progress)
    print_line(f"wrote {res.n_train} train + {res.n_valid} valid clips to {res.store}")
    print_line(f"labels: {res.train_csv}, {res.valid_csv}")
    print_line(
        f"oracle ceiling (valid mean Pearson of the generating function): {res.oracle['mean_pearson']:.4f}"
        f" (with missing modalities unknown: {res.oracle['mean_pearson_observable']:.4f})"
    )
    return 0
