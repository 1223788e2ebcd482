"""``taemi robustness``: score runs under test-time degradations, write CSV and plots.

A thin entry point over :func:`taemi.experiments.robustness.robustness_suite` (docs/method.md section 5):
modalities dropped for a fraction of clips, the 8 missing-modality combinations,
Gaussian feature noise at several SNRs, dropped frames. ``--compare`` adds more runs to
the same CSV and overlays them in the plots.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def _table(rows: list[dict]) -> str:
    lines = [f"{'run':<20}{'kind':<15}{'condition':<20}{'level':>7}{'mean r':>9}"]
    for r in rows:
        level = "" if r["level"] == "" else f"{float(r['level']):g}"
        lines.append(
            f"{Path(r['run']).name[:19]:<20}{r['kind']:<15}{r['condition']:<20}{level:>7}{r['mean_pearson']:>9.4f}"
        )
    return "\n".join(lines)


def cmd_robustness(args: argparse.Namespace) -> int:
    from taemi.config import load_config
    from taemi.data.labels import read_labels
    from taemi.experiments.robustness import plot_all, robustness_suite, write_rows
    from taemi.run import CONFIG_FILE
    from taemi.runtime import resolve_device
    from taemi.store import FeatureStore

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is a file; robustness writes a folder (robustness.csv, plots)"
        )
    store = FeatureStore(args.store)
    device = resolve_device(args.device)
    rows: list[dict] = []
    for run in [args.run, *(args.compare or [])]:
        cfg = load_config(Path(run) / CONFIG_FILE)
        labels = read_labels(
            args.labels, emotions=cfg.data.emotions, id_column=cfg.data.id_column, store_ids=store
        ).check_scorable("labelled")
        rows += robustness_suite(
            run, store, labels, seed=args.seed, which=args.which, device=device
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
    csv_path = write_rows(rows, out / "robustness.csv")
    pngs = plot_all(rows, out)
    sys.stdout.write(_table(rows) + "\n")
    sys.stdout.write(f"wrote {csv_path} and {len(pngs)} plots in {out}\n")
    return 0


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    sp = sub.add_parser(
        "robustness", help="score runs under dropped modalities, noise and dropped frames"
    )
    sp.add_argument("--run", required=True, help="run folder")
    sp.add_argument("--store", required=True, help="feature store of the labelled clips")
    sp.add_argument("--labels", required=True, help="label CSV of the clips to score")
    sp.add_argument("--out", required=True, help="output folder (robustness.csv, *.png)")
    sp.add_argument(
        "--compare", nargs="+", metavar="RUN", help="more run folders, overlaid in the plots"
    )
    sp.add_argument("--seed", type=int, default=0, help="seed of every degradation's random draws")
    sp.add_argument("--which", default="best", choices=("best", "last"), help="weights to load")
    sp.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    common(sp)
    sp.set_defaults(func=cmd_robustness)
