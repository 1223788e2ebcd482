"""``taemi cv``: k-fold cross-validation over train + valid pooled (see
:mod:`taemi.experiments.cv`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from taemi.cli.common import add_config_options, print_line


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "cv",
        help="k-fold cross-validation over train + valid pooled: a run per fold, out-of-fold "
        "predictions, per-fold and pooled scores (resumable)",
    )
    sp.add_argument("--store", required=True)
    sp.add_argument("--train", required=True, help="training label CSV (pooled with --valid)")
    sp.add_argument("--valid", required=True, help="validation label CSV (pooled with --train)")
    sp.add_argument(
        "--out",
        required=True,
        help="folder: fold_<j>/ runs, oof_predictions.csv, folds.csv, cv.json, cv.csv, cv.png, "
        "config.yaml",
    )
    sp.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    sp.add_argument(
        "--group-by",
        metavar="COLUMN_OR_CSV",
        help="keep each group in one fold: a column of both label CSVs (e.g. speaker), or a "
        "CSV file with the id column (Filename) and a 'group' column",
    )
    sp.add_argument(
        "--seed", type=int, default=0, help="seed of the fold assignment (runs use train.seed)"
    )
    add_config_options(sp, "paper")
    sp.add_argument("--jobs", type=int, default=1, help="folds trained in parallel processes")
    common(sp)
    sp.set_defaults(func=cmd_cv)


def cmd_cv(args: argparse.Namespace) -> int:
    from taemi.config import parse_overrides
    from taemi.experiments.cv import CV_CSV, CV_JSON, CV_PLOT, OOF_FILE, format_cv, run_cv

    if args.jobs == 1 and "OMP_NUM_THREADS" not in os.environ:
        from taemi.runtime import configure_threads

        configure_threads()  # one thread per core, as taemi train (workers: a share each)
    record = run_cv(
        args.store,
        args.train,
        args.valid,
        args.out,
        folds=args.folds,
        seed=args.seed,
        group_by=args.group_by,
        preset=args.preset,
        config_file=args.config,
        overrides=parse_overrides(args.set or []),
        jobs=args.jobs,
        progress=not args.no_progress,
    )
    print_line(format_cv(record))
    print_line(
        f"wrote {args.out}/{OOF_FILE}, {CV_JSON}, {CV_CSV}, {CV_PLOT} and the fold runs "
        f"{args.out}/fold_0 ... fold_{args.folds - 1}"
    )
    return 0
