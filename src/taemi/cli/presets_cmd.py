"""``taemi presets``: the named presets and how they differ from the paper model."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from taemi.cli.common import print_line


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub`` (it takes none of the shared options ``common`` adds)."""
    sp = sub.add_parser(
        "presets", help="list the named presets and how they differ from the paper model"
    )
    sp.set_defaults(func=cmd_presets)


def cmd_presets(args: argparse.Namespace) -> int:
    from taemi.config import PRESETS, preset

    paper = preset("paper").to_dict()["model"]
    for name in PRESETS:
        m = preset(name).to_dict()["model"]
        diff = {k: v for k, v in m.items() if v != paper[k]}
        print_line(f"{name:<22}{diff if diff else '(the paper model)'}")
    return 0
