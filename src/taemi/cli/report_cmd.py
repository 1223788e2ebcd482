"""``taemi report``: one self-contained HTML page (and/or Markdown) over run and experiment
folders; a thin entry point over :func:`taemi.experiments.report.build_report`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def cmd_report(args: argparse.Namespace) -> int:
    from taemi.cli.common import output_file
    from taemi.experiments.report import build_report

    out = args.out
    if out is None and args.markdown is None:
        out = "report.html"
    for path, flag in ((out, "--out"), (args.markdown, "--markdown")):
        if path is not None:
            output_file(path, flag)
    try:
        build_report(args.dirs, out_html=out, out_md=args.markdown)
    except OSError as e:  # a file that cannot be read or written (permissions, a full disk)
        raise ValueError(f"report: {e.filename}: {e.strerror or e}") from None
    for path in (out, args.markdown):
        if path is not None:
            sys.stdout.write(f"wrote {path}\n")
    return 0


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the ``report`` subcommand to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "report",
        help="one self-contained HTML (and/or Markdown) page over run and experiment folders",
    )
    sp.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="run folder (holds config.yaml) or experiment folder (PNGs, CSVs, summary.md, runs)",
    )
    sp.add_argument(
        "--out", help="HTML file (default: report.html unless only --markdown is given)"
    )
    sp.add_argument(
        "--markdown",
        metavar="FILE",
        help="also (or only) write Markdown; its figures are copied into FILE's <stem>_files/",
    )
    common(sp)
    sp.set_defaults(func=cmd_report)
