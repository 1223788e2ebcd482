"""``taemi compare``: is run A's validation score really different from run B's?

A thin entry point over :func:`taemi.experiments.compare.compare_runs`. Each of RUN_A and
RUN_B is a run folder (its ``valid_predictions.csv``: the raw validation predictions of
the best epoch, written by training) or a prediction CSV itself. Both must cover the
same clip ids and emotions; the targets come from ``--labels`` (the validation label
CSV). Prints both mean Pearson scores, the difference A - B with its percentile
confidence interval and two-sided p-value, and per-emotion Pearson side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from taemi.run import VALID_PREDICTIONS_FILE


def cmd_compare(args: argparse.Namespace) -> int:
    from taemi.cli.common import output_file, write_output
    from taemi.experiments.compare import compare_runs

    dst = output_file(args.out) if args.out else None
    c = compare_runs(
        args.run_a, args.run_b, args.labels, n_boot=args.n_boot, seed=args.seed, clip=args.clip
    )
    path_a, path_b, emotions, ma, mb, res = (
        c.path_a,
        c.path_b,
        c.emotions,
        c.metrics_a,
        c.metrics_b,
        c.result,
    )

    out = sys.stdout.write
    width = max(len(e) for e in (*emotions, "mean")) + 2
    out(f"A: {path_a}\nB: {path_b}\n")
    out(f"{res.n} clips, {'clipped' if args.clip else 'raw'} predictions, labels {args.labels}\n")
    out(f"{'emotion':<{width}}{'A':>9}{'B':>9}{'A-B':>9}\n")
    for e in emotions:
        ra, rb = ma.pearson[e], mb.pearson[e]
        out(f"{e:<{width}}{ra:>9.4f}{rb:>9.4f}{ra - rb:>+9.4f}\n")
    out(f"{'mean':<{width}}{res.mean_a:>9.4f}{res.mean_b:>9.4f}{res.diff:>+9.4f}\n")
    level = round(100 * (1 - res.alpha))
    p_text = f"< {1 / res.n_boot:.2g}" if res.p_value == 0.0 else f"= {res.p_value:.4f}"
    out(
        f"mean Pearson A - B = {res.diff:+.4f}, {level}% CI [{res.ci_low:+.4f}, {res.ci_high:+.4f}], "
        f"p {p_text} (paired bootstrap over clips, {res.n_boot} resamples, seed {args.seed})\n"
    )
    if args.out:
        report = {
            "run_a": str(path_a),
            "run_b": str(path_b),
            "labels": str(args.labels),
            "clipped": bool(args.clip),
            "seed": int(args.seed),
            **res.to_dict(),
            "pearson_a": {e: float(v) for e, v in ma.pearson.items()},
            "pearson_b": {e: float(v) for e, v in mb.pearson.items()},
        }
        assert dst is not None
        write_output(
            dst, lambda p: p.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        )
        out(f"wrote {dst}\n")
    return 0


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return n


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the ``compare`` subcommand to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "compare", help="paired bootstrap comparison of two runs' validation predictions"
    )
    sp.add_argument(
        "run_a",
        metavar="RUN_A",
        help=f"run folder (its {VALID_PREDICTIONS_FILE}) or prediction CSV",
    )
    sp.add_argument("run_b", metavar="RUN_B", help="the same for the other model")
    sp.add_argument("--labels", required=True, help="the validation label CSV (targets)")
    sp.add_argument("--n-boot", type=_positive_int, default=2000, help="bootstrap resamples")
    sp.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    sp.add_argument("--clip", action="store_true", help="clip predictions to [0, 1] before scoring")
    sp.add_argument("--out", help="also write the result as JSON here")
    common(sp)
    sp.set_defaults(func=cmd_compare)
