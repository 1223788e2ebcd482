"""``taemi evaluate``: score a run on labelled clips; the metrics go to a JSON file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from taemi.cli.common import (
    add_run_options,
    metrics_table,
    output_file,
    print_line,
    write_output,
)


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser("evaluate", help="score a run on labelled clips")
    add_run_options(sp, precision_default="run")
    sp.add_argument("--store", required=True)
    sp.add_argument(
        "--clip",
        action="store_true",
        help="clip predictions to [0, 1] before scoring (default: raw)",
    )
    sp.add_argument("--labels", required=True, help="label CSV")
    sp.add_argument("--out", help="metrics JSON (default: RUN/eval_<labels>.json)")
    common(sp)
    sp.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from taemi.data.labels import read_labels
    from taemi.eval.metrics import compute_metrics
    from taemi.inference import Predictor
    from taemi.runtime import resolve_device
    from taemi.store import FeatureStore

    out = output_file(args.out) if args.out else None  # checked before the work
    predictor = Predictor.from_run(args.run, args.which)
    cfg = predictor.cfg
    out = out or output_file(Path(args.run) / f"eval_{Path(args.labels).stem}.json")
    store = FeatureStore(args.store)
    predictor.check_store(store)
    labels = read_labels(
        args.labels, emotions=cfg.data.emotions, id_column=cfg.data.id_column, store_ids=store
    )
    labels.check_scorable("labelled")
    device = resolve_device(args.device)
    precision, why = _evaluation_precision(args.run, args.precision, device)
    pred = predictor.on(device, precision).predict(
        predictor.dataset(store, labels),
        progress=not args.no_progress,
        check=f"evaluate {args.run} on {args.store}",
    )
    metrics = compute_metrics(pred, labels.values, cfg.data.emotions, clipped=args.clip).to_dict()
    report = {
        "run": str(args.run),
        "weights": args.which,
        "store": str(args.store),
        "labels": str(args.labels),
        "precision": precision,
        "device": str(device),
        **metrics,
    }
    write_output(out, lambda p: p.write_text(json.dumps(report, indent=2), encoding="utf-8"))
    print_line(metrics_table(metrics, f"{args.labels} ({args.which} weights):"))
    print_line(f"scored in {precision}: {why}")
    print_line(f"metrics written to {out}")
    return 0


def _evaluation_precision(run: str, asked: str, device) -> tuple[str, str]:
    """The precision evaluate scores in, and why. ``run`` (the default): the one the run
    validated in (its metrics.json), so the figure reproduces metrics.json; fp32 where
    that one cannot run here (fp16 off CUDA) or the run records none."""
    from taemi.config import ConfigError
    from taemi.run import METRICS_FILE, read_metrics
    from taemi.runtime import resolve_precision

    validated = (read_metrics(run) or {}).get("precision")
    validated = validated if validated in ("fp32", "bf16", "fp16") else None
    source = Path(run) / METRICS_FILE
    if asked != "run":
        precision = resolve_precision(asked, device)
        if validated is not None and validated != precision:
            return precision, (
                f"--precision {asked}; {run} validated in {validated} ({source}), so these figures "
                f"can differ slightly from its metrics (--precision run scores as it did)"
            )
        return precision, f"--precision {asked}"
    if validated is None:
        return "fp32", f"{run} records no validation precision ({source}): fp32"
    try:
        return resolve_precision(validated, device), f"the precision {run} validated in ({source})"
    except ConfigError:
        return "fp32", (
            f"{run} validated in {validated}, which needs CUDA: fp32 here, so these figures can "
            f"differ slightly from its metrics ({source})"
        )
