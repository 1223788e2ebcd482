"""``taemi compare``: is run A's validation score really different from run B's?

A thin entry point over :func:`taemi.eval.stats.paired_bootstrap`. Each of RUN_A and
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
from pathlib import Path

import numpy as np

PREDICTIONS_FILE = "valid_predictions.csv"
_MAX_LISTED = 5


def _predictions_path(run: str) -> Path:
    p = Path(run)
    if p.is_dir():
        f = p / PREDICTIONS_FILE
        if not f.is_file():
            raise FileNotFoundError(
                f"{p} has no {PREDICTIONS_FILE} (training writes it when it has a validation split)"
            )
        return f
    if p.is_file():
        return p
    raise FileNotFoundError(f"{p} is neither a run folder nor a prediction CSV")


def _listed(ids: list[str]) -> str:
    more = f" ... ({len(ids)} in all)" if len(ids) > _MAX_LISTED else ""
    return f"{ids[:_MAX_LISTED]}{more}"


def _load(args: argparse.Namespace):
    """(pred A, pred B, labels) aligned on A's ids, after the consistency checks."""
    from taemi.data.labels import read_labels

    path_a, path_b = _predictions_path(args.run_a), _predictions_path(args.run_b)
    pa = read_labels(path_a, emotions=None, value_range=None)
    pb = read_labels(path_b, emotions=None, value_range=None)
    if set(pa.emotions) != set(pb.emotions):
        raise ValueError(
            f"{path_a} has emotions {list(pa.emotions)} but {path_b} has {list(pb.emotions)}"
        )
    ids_a, ids_b = set(pa.ids), set(pb.ids)
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise ValueError(
            f"the prediction files cover different clips: {len(only_a)} id(s) only in {path_a}"
            f" {_listed(only_a)}, {len(only_b)} id(s) only in {path_b} {_listed(only_b)}"
        )
    labels = read_labels(args.labels, emotions=pa.emotions)
    missing = sorted(ids_a - set(labels.ids))
    if missing:
        raise ValueError(
            f"{len(missing)} predicted id(s) have no label in {args.labels}: {_listed(missing)}"
        )
    b_cols = [pb.emotions.index(e) for e in pa.emotions]
    b_rows = pb.index()
    pred_b = pb.values[[b_rows[i] for i in pa.ids]][:, b_cols]  # (N, E) in A's row/column order
    target = labels.subset(pa.ids)  # (N, E)
    return path_a, path_b, pa, pred_b, target


def cmd_compare(args: argparse.Namespace) -> int:
    from taemi.cli.main import _output_file, _write_output
    from taemi.eval.metrics import compute_metrics
    from taemi.eval.stats import paired_bootstrap

    dst = _output_file(args.out) if args.out else None
    path_a, path_b, pa, pred_b, target = _load(args)
    a = pa.values.astype(np.float64)  # (N, E)
    b = pred_b.astype(np.float64)  # (N, E)
    if args.clip:
        a, b = np.clip(a, 0.0, 1.0), np.clip(b, 0.0, 1.0)
    t = target.values.astype(np.float64)  # (N, E)
    emotions = pa.emotions
    ma = compute_metrics(a, t, emotions, clipped=args.clip)
    mb = compute_metrics(b, t, emotions, clipped=args.clip)
    res = paired_bootstrap(a, b, t, n_boot=args.n_boot, seed=args.seed)

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
        _write_output(dst, lambda p: p.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"))
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
        "run_a", metavar="RUN_A", help=f"run folder (its {PREDICTIONS_FILE}) or prediction CSV"
    )
    sp.add_argument("run_b", metavar="RUN_B", help="the same for the other model")
    sp.add_argument("--labels", required=True, help="the validation label CSV (targets)")
    sp.add_argument("--n-boot", type=_positive_int, default=2000, help="bootstrap resamples")
    sp.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    sp.add_argument("--clip", action="store_true", help="clip predictions to [0, 1] before scoring")
    sp.add_argument("--out", help="also write the result as JSON here")
    common(sp)
    sp.set_defaults(func=cmd_compare)
