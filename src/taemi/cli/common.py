"""Small helpers the ``taemi`` commands share: printing, the metrics table, output-file
checks, ``ROLE=VALUE`` options and the argument groups several commands add."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# --------------------------------------------------------------------------- printing


def print_line(text: str = "") -> None:
    """One line of a command's result on stdout (diagnostics go to ``logging``)."""
    sys.stdout.write(text + "\n")


def metrics_table(metrics: dict, title: str) -> str:
    """Per-emotion Pearson and CCC, their means, MSE and n (a ``Metrics.to_dict()``)."""
    width = max(len(e) for e in metrics["pearson"]) + 2
    lines = [title, f"{'emotion':<{width}}{'Pearson':>9}{'CCC':>9}"]
    for e, r in metrics["pearson"].items():
        lines.append(f"{e:<{width}}{r:>9.4f}{metrics['ccc'][e]:>9.4f}")
    lines.append(f"{'mean':<{width}}{metrics['mean_pearson']:>9.4f}{metrics['mean_ccc']:>9.4f}")
    lines.append(
        f"MSE {metrics['mse']:.5f} over n={metrics['n']} clips ({'clipped' if metrics['clipped'] else 'raw'} predictions)"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- output files


def output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check an output file path before the work that fills it: not a folder, below a
    folder (created when missing) that can be written; errors name the path."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder; give the name of the file to write")
    anc = p.parent
    while not anc.exists() and not anc.is_symlink():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{flag} {p}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {p}: the folder {anc} is not writable")
    return p


def write_output(path: Path, write, flag: str = "--out") -> None:
    """``write(path)``, with a failure to create or write the file (permissions, a full
    disk) reported as the one-line error naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write it: {e.strerror or e}") from None


# --------------------------------------------------------------------------- options


def key_value(item: str, flag: str) -> tuple[str, str]:
    """``ROLE=VALUE`` of a repeatable option such as ``--model asr=DIR``."""
    if "=" not in item:
        raise ValueError(f"{flag} {item!r} is not of the form role=value")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def add_progress_option(sp: argparse.ArgumentParser) -> None:
    """``--no-progress`` (the option every long-running command has)."""
    sp.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_config_options(sp: argparse.ArgumentParser, preset_default: str | None) -> None:
    """``--preset``, ``--config`` and ``--set`` (taemi.config.build_config)."""
    sp.add_argument(
        "--preset",
        default=preset_default,
        help="paper | official | an ablation variant (see `taemi presets`)",
    )
    sp.add_argument("--config", help="YAML file of settings applied over the preset")
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one setting, e.g. model.hidden=256 (repeatable)",
    )


def add_run_options(sp: argparse.ArgumentParser, precision_default: str = "fp32") -> None:
    """``--run``, ``--which``, ``--device`` and ``--precision`` of the commands that use a
    trained run; ``precision_default="run"`` adds the choice ``run`` (evaluate)."""
    sp.add_argument("--run", required=True, help="run folder (from train or import-release)")
    sp.add_argument("--which", default="best", choices=("best", "last"), help="which weights")
    sp.add_argument("--device", default="auto")
    choices = ("run",) * (precision_default == "run") + ("auto", "fp32", "fp16", "bf16")
    sp.add_argument(
        "--precision",
        default=precision_default,
        choices=choices,
        help="autocast precision"
        + (
            " (default run: the one the run validated in, its "
            "metrics.json, so the score reproduces it; fp32 when the run "
            "records none or it cannot run here)"
            if precision_default == "run"
            else ""
        ),
    )
