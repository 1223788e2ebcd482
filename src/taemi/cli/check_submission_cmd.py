"""``taemi check-submission``: validate a submission CSV against the test id list
(see :func:`taemi.eval.submission.check_submission`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from taemi.cli.common import print_line


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub`` (it takes none of the shared options ``common`` adds)."""
    sp = sub.add_parser(
        "check-submission", help="validate a submission CSV against the test id list"
    )
    sp.add_argument("file", help="the submission CSV")
    sp.add_argument("--ids", required=True, help="CSV whose id column lists every test id")
    sp.add_argument(
        "--emotions", help="comma-separated value columns, in order (default: the EMI six)"
    )
    sp.add_argument(
        "--id-column", default="Filename", help="id column of both files (default: Filename)"
    )
    sp.add_argument(
        "--show", type=int, default=5, help="examples listed per kind of problem (default: 5)"
    )
    sp.set_defaults(func=cmd_check_submission)


def cmd_check_submission(args: argparse.Namespace) -> int:
    from taemi import EMI_EMOTIONS
    from taemi.data.labels import read_ids
    from taemi.eval.submission import check_submission

    emotions = tuple(e.strip() for e in args.emotions.split(",")) if args.emotions else EMI_EMOTIONS
    ids = read_ids(args.ids, args.id_column)
    report = check_submission(
        args.file, ids, emotions, id_column=args.id_column, max_listed=args.show
    )
    if report.ok:
        print_line(
            f"{args.file}: valid submission ({report.rows} rows = the {len(ids)} test ids, sorted; "
            f"columns {args.id_column},{','.join(emotions)}; values in [0, 1])"
        )
    else:
        print_line(
            f"{args.file}: NOT a valid submission for {args.ids} ({len(report.problems)} kind(s) of problem, "
            f"{report.rows} rows read, {len(ids)} test ids)"
        )
        for p in report.problems:
            print_line(f"  - {p}")
    for w in report.warnings:
        print_line(f"  warning: {w}")
    return 0 if report.ok else 1
