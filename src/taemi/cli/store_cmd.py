"""``taemi store info | verify | merge``: inspect, check and merge feature stores; ``merge``
is registered by :mod:`taemi.cli.distributed_cmd` (it merges the shards of a distributed extraction)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from taemi.cli import distributed_cmd
from taemi.cli.common import print_line


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser("store", help="inspect a feature store")
    ssub = sp.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    s2 = ssub.add_parser("info", help="summary of a store")
    s2.add_argument("store")
    s2.add_argument("--json", action="store_true")
    s2.set_defaults(func=cmd_store_info)
    s2 = ssub.add_parser("verify", help="check checksums, shapes and values")
    s2.add_argument("store")
    common(s2)
    s2.set_defaults(func=cmd_store_verify)
    distributed_cmd.register_store_merge(ssub, common)


def cmd_store_info(args: argparse.Namespace) -> int:
    from taemi.store import format_info, store_info

    info = store_info(args.store)
    print_line(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from taemi.store import verify_store

    problems = verify_store(args.store, progress=not args.no_progress)
    if problems:
        print_line(f"{args.store}: {len(problems)} problem(s)")
        for p in problems:
            print_line(f"  - {p}")
        return 1
    print_line(f"{args.store}: OK (checksums, shapes, finite values)")
    return 0
