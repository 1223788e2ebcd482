"""``taemi baselines``: ridge and a small MLP on pooled features of each modality and of all
three (see :mod:`taemi.experiments.baselines`), scored on the validation split."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "baselines",
        help="ridge and MLP baselines on pooled features (what the fusion model must beat)",
    )
    sp.add_argument("--store", required=True, help="feature store")
    sp.add_argument("--train", required=True, help="training label CSV")
    sp.add_argument("--valid", required=True, help="validation label CSV (selection and score)")
    sp.add_argument(
        "--out",
        required=True,
        help="folder for baselines.json, baselines.csv, baselines.png, settings.json",
    )
    sp.add_argument(
        "--models", default="ridge,mlp", help="comma-separated: ridge, mlp (default both)"
    )
    sp.add_argument(
        "--features",
        default="audio,vision,text,all",
        help="comma-separated feature sets: audio, vision, text, all (default every one)",
    )
    sp.add_argument(
        "--seeds", type=int, default=1, help="MLP seeds (ridge is deterministic: one value)"
    )
    sp.add_argument("--first-seed", type=int, default=3407, help="the first MLP seed")
    sp.add_argument(
        "--emotions", help="comma-separated value columns, in order (default: the EMI six)"
    )
    common(sp)
    sp.set_defaults(func=cmd_baselines)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def cmd_baselines(args: argparse.Namespace) -> int:
    from taemi import EMI_EMOTIONS
    from taemi.cli.common import print_line
    from taemi.data.labels import read_labels
    from taemi.experiments.baselines import (
        PLOT_FILE,
        RESULTS_CSV,
        RESULTS_JSON,
        BaselineSettings,
        run_baselines,
        summarise,
        write_baselines,
    )
    from taemi.store import FeatureStore

    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: must be >= 1")
    settings = BaselineSettings(models=_names(args.models), feature_sets=_names(args.features))
    emotions = _names(args.emotions) if args.emotions else EMI_EMOTIONS
    store = FeatureStore(args.store)
    kw = {"emotions": emotions, "store_ids": store}
    train, valid = read_labels(args.train, **kw), read_labels(args.valid, **kw)
    seeds = [args.first_seed + k for k in range(args.seeds)]
    results = run_baselines(store, train, valid, settings, seeds=seeds)
    inputs = {"store": str(args.store), "train": str(args.train), "valid": str(args.valid)}
    write_baselines(args.out, results, settings, {**inputs, "seeds": seeds})
    print_line(format_summary(summarise(results)))
    print_line(f"wrote {args.out}/{RESULTS_JSON}, {RESULTS_CSV}, {PLOT_FILE}")
    return 0


def format_summary(summary: list[dict]) -> str:
    """The summary as a fixed-width table (name, seeds, mean Pearson +- std, CCC, hyper)."""
    lines = [f"{'baseline':<14}{'seeds':>6}  {'valid mean Pearson':<22}{'mean CCC':>9}  chosen"]
    for s in summary:
        spread = (
            "(deterministic)"
            if s["deterministic"]
            else ("" if s["std"] is None else f"+- {s['std']:.4f}")
        )
        lines.append(
            f"{s['name']:<14}{s['n']:>6}  {s['mean']:.4f} {spread:<15}{s['mean_ccc']:>9.4f}  "
            + "; ".join(dict.fromkeys(s["hyper"]))
        )
    return "\n".join(lines)
