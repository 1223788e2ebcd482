"""ABAW EMI submissions: write one, and check one against the test id list.

Format (docs/method.md section 2): a CSV with the label header ``Filename,<the six EMI emotions
in order>``, one row per test id, sorted by id. Predictions are clipped to [0, 1] only
here, when a submission is written (docs/method.md sections 4 and 8); metrics use raw values.

:func:`check_submission` reads a file the way a strict scorer would, without trusting
anything, and reports every problem, grouped by kind (the first few of each kind and
how many there are):

- errors (the file is not a valid submission): no header or another header (names,
  order, spaces), rows with the wrong number of fields, empty ids, ids with surrounding
  spaces, duplicate ids, ids that lost their leading zeros (``42`` or ``42.0`` where
  ``00042`` is expected: the ids went through a number somewhere, e.g. pandas without
  ``dtype={"Filename": str}``), ids not in the test list, test ids without a row,
  non-numeric, NaN/Inf or out-of-range values, and rows not sorted by id;
- warnings (accepted): a UTF-8 byte-order mark, blank lines.

Unsorted rows are an error, not a warning: the format asks for sorted rows, and a scorer
that compares rows by position instead of by id would score an unsorted file silently
wrong. The fix is one sort (:func:`write_submission` always sorts).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from taemi import EMI_EMOTIONS
from taemi.data.labels import write_predictions

__all__ = ["SubmissionCheck", "check_submission", "write_submission"]

#: Examples listed per kind of problem before summarising with a count.
MAX_LISTED = 5

_NUMBER_ID = re.compile(r"\d+(\.0*)?")  # "42", "42.0": an id that went through a number


def write_submission(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    emotions: Sequence[str],
    values: np.ndarray,
    *,
    clip: bool = True,
) -> None:
    """Write (N, E) predictions as an ABAW submission: header ``Filename,<emotions>``, rows
    sorted by id, values clipped to [0, 1] unless ``clip=False`` (raw values). See
    :func:`taemi.data.labels.write_predictions` for the exact number format and errors."""
    write_predictions(path, ids, emotions, values, clip=clip)


@dataclass
class SubmissionCheck:
    """What :func:`check_submission` found; ``ok`` when there is no problem."""

    path: str
    rows: int = 0  # data rows read (blank lines not counted)
    problems: list[str] = field(default_factory=list)  # one line per kind of problem
    warnings: list[str] = field(default_factory=list)  # accepted, but worth fixing

    @property
    def ok(self) -> bool:
        return not self.problems


#: Kinds of problem, in the order they are reported (structure, ids, values, order).
_KIND_ORDER = (
    "malformed CSV",
    "rows with the wrong number of fields",
    "rows without an id",
    "ids with spaces around them",
    "duplicate ids",
    "ids that lost their leading zeros",
    "ids not in the test list",
    "test ids without a row",
    "rows with values that are not numbers",
    "rows with NaN or infinite values",
    "rows with values outside",
    "rows not sorted by id",
)


class _Kinds:
    """Problems collected by kind, each with its examples (one per row or id)."""

    def __init__(self) -> None:
        self.items: dict[str, list[str]] = {}
        self.hints: dict[str, str] = {}

    def add(self, kind: str, example: str, hint: str = "") -> None:
        self.items.setdefault(kind, []).append(example)
        if hint:
            self.hints[kind] = hint

    def lines(self, max_listed: int) -> list[str]:
        def rank(kind: str) -> int:
            return next(i for i, prefix in enumerate(_KIND_ORDER) if kind.startswith(prefix))

        out = []
        for kind in sorted(self.items, key=rank):
            examples = self.items[kind]
            shown = "; ".join(examples[:max_listed])
            more = (
                f"; ... and {len(examples) - max_listed} more" if len(examples) > max_listed else ""
            )
            hint = f" ({self.hints[kind]})" if kind in self.hints else ""
            out.append(f"{kind} ({len(examples)}): {shown}{more}{hint}")
        return out


def check_submission(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    emotions: Sequence[str] = EMI_EMOTIONS,
    *,
    id_column: str = "Filename",
    value_range: tuple[float, float] = (0.0, 1.0),
    max_listed: int = MAX_LISTED,
) -> SubmissionCheck:
    """Check the submission CSV at ``path`` against the test ids ``ids``.

    Args:
        path: the submission file.
        ids: every test id exactly once, as strings (``"00042"``).
        emotions: the value columns, in order (the EMI six by default).
        id_column: name of the id column.
        value_range: inclusive bounds of a valid value.
        max_listed: examples shown per kind of problem.

    Returns:
        A :class:`SubmissionCheck`: ``problems`` (one line per kind: count and the first
        examples with their line numbers) and ``warnings``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``ids`` repeats an id.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(
            f"submission {src} does not exist" + (" (it is a folder)" if src.is_dir() else "")
        )
    expected_ids = list(ids)
    if len(set(expected_ids)) != len(expected_ids):
        raise ValueError(
            f"the test id list repeats ids, e.g. {sorted({i for i in expected_ids if expected_ids.count(i) > 1})[:3]}"
        )
    report = SubmissionCheck(str(src))
    problems = _Kinds()
    try:
        text = src.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        report.problems.append(f"not valid UTF-8 text: {e}")
        return report
    if text.startswith("\ufeff"):
        report.warnings.append(
            "the file starts with a UTF-8 byte-order mark (most readers drop it; some keep it in the first column name)"
        )
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        report.problems.append(f"malformed CSV: {e}")
        return report
    if not header:
        report.problems.append("the file is empty: no header, no rows")
        return report

    want = [id_column, *emotions]
    if header != want:
        report.problems.append(_header_problem(header, want, id_column))
    ncols = len(want)

    seen: dict[str, list[int]] = {}  # id -> lines
    order: list[tuple[str, int]] = []  # (id, line) in file order
    blank: list[int] = []
    lo, hi = value_range
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(c.strip() == "" for c in row):
                blank.append(line)
                continue
            report.rows += 1
            raw_id = row[0]
            clip_id = raw_id.strip()
            if clip_id != raw_id:
                problems.add("ids with spaces around them", f"line {line}: {raw_id!r}")
            if not clip_id:
                problems.add("rows without an id", f"line {line}")
            else:
                seen.setdefault(clip_id, []).append(line)
                order.append((clip_id, line))
            if len(row) != ncols:
                problems.add(
                    "rows with the wrong number of fields",
                    f"line {line}: {len(row)} fields, not {ncols}",
                )
                continue
            bad: dict[str, list[str]] = {}  # kind -> "column: value" of this row
            for name, cell in zip(want[1:], row[1:]):
                try:
                    v = float(cell)
                except ValueError:
                    bad.setdefault("rows with values that are not numbers", []).append(
                        f"{name} {cell!r}"
                    )
                    continue
                if not math.isfinite(v):
                    bad.setdefault("rows with NaN or infinite values", []).append(
                        f"{name} {cell!r}"
                    )
                elif not lo <= v <= hi:
                    bad.setdefault(f"rows with values outside [{lo:g}, {hi:g}]", []).append(
                        f"{name} {cell}"
                    )
            for kind, cells in bad.items():
                problems.add(kind, f"line {line}, {clip_id or '(no id)'}: {', '.join(cells)}")
    except csv.Error as e:
        problems.add("malformed CSV", f"line {reader.line_num}: {e}")
    if blank:
        report.warnings.append(
            f"{len(blank)} blank line(s), e.g. line(s) {', '.join(map(str, blank[:max_listed]))}"
        )
    if report.rows == 0:
        report.problems.append("no data rows")

    for clip_id, lines in seen.items():
        if len(lines) > 1:
            problems.add("duplicate ids", f"{clip_id!r} on lines {', '.join(map(str, lines))}")
    expected = set(expected_ids)
    by_number = _ids_by_number(expected_ids)
    lost: dict[str, str] = {}  # id in the file -> the test id it was meant to be
    extra: list[str] = []
    for clip_id, lines in seen.items():
        if clip_id in expected:
            continue
        meant = by_number.get(int(float(clip_id))) if _NUMBER_ID.fullmatch(clip_id) else None
        if meant is not None and meant not in seen:
            lost[clip_id] = meant
            problems.add(
                "ids that lost their leading zeros",
                f"line {lines[0]}: {clip_id!r} should be {meant!r}",
                hint="the ids were read as numbers somewhere, e.g. by pandas without "
                "dtype={'Filename': str}; keep them as strings",
            )
        else:
            extra.append(f"{clip_id!r} (line {lines[0]})")
    for e in extra:
        problems.add("ids not in the test list", e)
    for clip_id in expected_ids:
        if clip_id not in seen and clip_id not in lost.values():
            problems.add("test ids without a row", repr(clip_id))
    # sorted by id; an id that lost its zeros is reported above and sorts as the id it meant
    canonical = [lost.get(clip_id, clip_id) for clip_id, _ in order]
    for k in range(1, len(order)):
        if canonical[k] < canonical[k - 1]:
            problems.add(
                "rows not sorted by id",
                f"line {order[k][1]}: {order[k][0]!r} comes after {order[k - 1][0]!r}",
                hint="the format lists rows sorted by id; sort them",
            )
            break
    report.problems += problems.lines(max_listed)
    return report


def _header_problem(header: list[str], want: list[str], id_column: str) -> str:
    got = ",".join(header)
    expected = ",".join(want)
    if [h.strip() for h in header] == want:
        return f"the header has spaces around column names: {got!r}; expected {expected!r}"
    if header and _NUMBER_ID.fullmatch(header[0].strip()) and id_column not in header:
        return f"no header row: the first line looks like data ({got!r}); expected the header {expected!r}"
    if sorted(header) == sorted(want):
        return (
            f"the header has the right columns in the wrong order: {got!r}; expected {expected!r}"
        )
    missing = [w for w in want if w not in header]
    unexpected = [h for h in header if h not in want]
    detail = "; ".join(
        part
        for part in (
            f"missing {missing}" if missing else "",
            f"unexpected {unexpected}" if unexpected else "",
        )
        if part
    )
    return f"the header is {got!r}; expected {expected!r}" + (f" ({detail})" if detail else "")


def _ids_by_number(ids: Sequence[str]) -> dict[int, str]:
    """Digit-only ids by their integer value (``"00042"`` -> 42); values that several ids
    share (``"042"`` and ``"0042"``) are left out: a lost zero could not say which."""
    out: dict[int, str] = {}
    clash: set[int] = set()
    for clip_id in ids:
        if clip_id.isdigit():
            n = int(clip_id)
            if n in out:
                clash.add(n)
            out[n] = clip_id
    for n in clash:
        del out[n]
    return out
