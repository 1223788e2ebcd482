"""``taemi ensemble``: the weighted mean of several runs' raw predictions, scored next to
each member, written as an ABAW submission (see :mod:`taemi.experiments.ensemble`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "ensemble",
        help="average several runs' predictions (equal or fitted weights) into one submission",
        description="Media files go before --runs or after `--` (e.g. "
        "taemi ensemble --runs A B --out DIR -- clip1.mp4 clip2.mp4).",
    )
    sp.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="run folders (>= 2)")
    sp.add_argument(
        "media",
        nargs="*",
        metavar="MEDIA",
        help="video/audio files or folders: features extracted once (the runs must share "
        "one extraction), then every run predicts",
    )
    sp.add_argument("--out", required=True, help="folder for predictions.csv and ensemble.json")
    sp.add_argument("--store", help="feature store of --labels, --fit-on and --ids")
    sp.add_argument("--labels", help="labelled split to score the members and the ensemble on")
    sp.add_argument(
        "--weights",
        default="equal",
        choices=("equal", "fit"),
        help="equal: 1/M each; fit: non-negative, summing to 1, maximising mean Pearson",
    )
    sp.add_argument("--fit-on", help="labelled split the weights are fitted on (default --labels)")
    sp.add_argument(
        "--ids", help="CSV whose id column lists the submission's clips (default: the whole store)"
    )
    sp.add_argument("--which", default="best", choices=("best", "last"), help="which weights")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--precision", default="fp32", choices=("auto", "fp32", "fp16", "bf16"))
    sp.add_argument(
        "--clip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip the submission to [0, 1] (default); --no-clip writes raw values",
    )
    sp.add_argument("--batch-size", type=int, default=8, help="MEDIA: clips per model batch")
    sp.add_argument("--workers", type=int, default=2, help="MEDIA: decoding threads")
    common(sp)
    sp.set_defaults(func=cmd_ensemble)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from taemi.cli.common import print_line
    from taemi.experiments.ensemble import ENSEMBLE_FILE, SUBMISSION_FILE, ensemble

    record = ensemble(
        args.runs,
        args.out,
        store=args.store,
        labels=args.labels,
        weighting=args.weights,
        fit_on=args.fit_on,
        ids=args.ids,
        media=args.media,
        which=args.which,
        device=args.device,
        precision=args.precision,
        clip=args.clip,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print_line(format_record(record))
    print_line(f"wrote {args.out}/{SUBMISSION_FILE} and {args.out}/{ENSEMBLE_FILE}")
    return 1 if record.get("failures") else 0


def format_record(record: dict) -> str:
    """Weights per member and, when scored, each member's and the ensemble's scores."""
    scores = record.get("scores")
    lines = [f"{record['weighting']} weights over {len(record['members'])} runs:"]
    for i, (m, w) in enumerate(zip(record["members"], record["weights"])):
        score = ""
        if scores:
            s = scores["members"][i]
            score = f"  mean Pearson {s['mean_pearson']:.4f}  mean CCC {s['mean_ccc']:.4f}"
        lines.append(f"  {w:.4f}  {m['run']} ({m['preset']}, {m['mode']}, seed {m['seed']}){score}")
    if scores:
        e = scores["ensemble"]
        lines.append(
            f"ensemble on {scores['labels']}: mean Pearson {e['mean_pearson']:.4f}, "
            f"mean CCC {e['mean_ccc']:.4f}  ("
            + ", ".join(f"{k} {v:.3f}" for k, v in e["pearson"].items())
            + ")"
        )
    if "fit" in record and "note" in record["fit"]:
        lines.append(f"note: {record['fit']['note']}")
    return "\n".join(lines)
