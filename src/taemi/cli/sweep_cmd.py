"""``taemi sweep``: hyperparameter search over config fields with Optuna (see
:mod:`taemi.experiments.sweep`)."""

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
        "sweep",
        help="hyperparameter search with Optuna over config fields (--space YAML): pruning, "
        "parallel processes, resumable; trials.csv, best_config.yaml, plots",
    )
    sp.add_argument("--store", required=True)
    sp.add_argument("--train", required=True, help="training label CSV")
    sp.add_argument("--valid", required=True, help="validation label CSV")
    sp.add_argument(
        "--out",
        required=True,
        help="sweep folder: study.db, trials/trial_<k>/, trials.csv, best_config.yaml, "
        "sweep.json, objective.png, importance.png, parallel.png",
    )
    sp.add_argument(
        "--space",
        required=True,
        help="YAML: one entry per dotted config key, e.g. 'train.lr: {low: 1.0e-5, high: "
        "1.0e-3, log: true}', 'train.batch_size: {low: 16, high: 64, step: 16}', "
        "'model.hidden: {choices: [64, 128]}'",
    )
    sp.add_argument(
        "--trials",
        type=int,
        required=True,
        help="finished (complete or pruned) trials the study should hold; a rerun continues "
        "until there are this many",
    )
    sp.add_argument("--jobs", type=int, default=1, help="trials run in parallel processes")
    add_config_options(sp, "paper")
    sp.add_argument(
        "--storage",
        help="Optuna RDB URL of the study (default sqlite:///OUT/study.db); e.g. "
        "postgresql://... to share it between machines (OUT on a shared file system)",
    )
    sp.add_argument("--study-name", default="taemi-sweep", help="the study's name in --storage")
    sp.add_argument(
        "--objective",
        choices=("valid", "cv"),
        default="valid",
        help="valid: best validation mean Pearson of one run per trial (prunable); cv: "
        "pooled out-of-fold mean Pearson of a k-fold CV per trial over train + valid",
    )
    sp.add_argument("--folds", type=int, default=5, help="--objective cv: number of folds")
    sp.add_argument("--fold-seed", type=int, default=0, help="--objective cv: seed of the folds")
    sp.add_argument(
        "--group-by",
        metavar="COLUMN_OR_CSV",
        help="--objective cv: keep each group in one fold (as taemi cv --group-by)",
    )
    sp.add_argument(
        "--pruner",
        choices=("median", "none"),
        default="median",
        help="stop a trial whose validation curve is below the median of the finished "
        "trials at the same epoch (objective valid)",
    )
    sp.add_argument(
        "--prune-startup",
        type=int,
        default=5,
        help="complete trials before any trial is pruned (default 5)",
    )
    sp.add_argument(
        "--prune-warmup",
        type=int,
        default=1,
        help="first epochs of a trial that are never pruned (default 1)",
    )
    sp.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    common(sp)
    sp.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from taemi.config import parse_overrides
    from taemi.experiments.sweep import run_sweep
    from taemi.experiments.sweep_folder import (
        BEST_CONFIG,
        SWEEP_JSON,
        TRIALS_CSV,
        format_sweep,
        import_optuna,
    )

    try:
        import_optuna()
    except ImportError as e:
        raise ValueError(str(e)) from None
    if args.jobs == 1 and "OMP_NUM_THREADS" not in os.environ:
        from taemi.runtime import configure_threads

        configure_threads()  # one thread per core, as taemi train (workers: a share each)
    record = run_sweep(
        args.store,
        args.train,
        args.valid,
        args.out,
        args.space,
        args.trials,
        jobs=args.jobs,
        preset=args.preset,
        config_file=args.config,
        overrides=parse_overrides(args.set or []),
        storage=args.storage,
        study_name=args.study_name,
        objective=args.objective,
        folds=args.folds,
        fold_seed=args.fold_seed,
        group_by=args.group_by,
        pruner=args.pruner,
        prune_startup=args.prune_startup,
        prune_warmup=args.prune_warmup,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print_line(format_sweep(record))
    print_line(f"wrote {args.out}/{TRIALS_CSV}, {SWEEP_JSON}, {BEST_CONFIG} and the plots")
    return 0
