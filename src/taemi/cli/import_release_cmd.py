"""``taemi import-release``: the authors' released fusion weights -> a run folder."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from taemi.cli.common import print_line


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub`` (it takes none of the shared options ``common`` adds)."""
    sp = sub.add_parser(
        "import-release", help="convert the authors' released fusion weights into a run folder"
    )
    sp.add_argument("checkpoint")
    sp.add_argument("--out", required=True, help="run folder to write")
    sp.add_argument("--emotions", help="comma-separated output names (default: the EMI six)")
    sp.set_defaults(func=cmd_import_release)


def cmd_import_release(args: argparse.Namespace) -> int:
    from taemi.release import import_release

    emotions = tuple(e.strip() for e in args.emotions.split(",")) if args.emotions else None
    kw = {"emotions": emotions} if emotions else {}
    out = import_release(args.checkpoint, args.out, **kw)
    print_line(
        f"imported {args.checkpoint} into run folder {out} (preset 'official'); use it with evaluate/predict"
    )
    return 0
