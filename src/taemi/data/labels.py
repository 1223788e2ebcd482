"""ABAW-style label and prediction CSVs.

Format (ABAW EMI / Hume-Vidmimic2, docs/method.md sections 1-2): a header
``Filename,<emotion columns>`` and one row per clip. ``Filename`` is an id such as
``00042`` and is kept as a string exactly as written (parsing it as an int would
lose the zero padding). Other columns may be present (CREMA-D's ``media``,
``rating_mode``, ``transcript``...) and are ignored unless asked for.

Every problem in a label file raises :class:`LabelError`, whose message names the
file, the row and the offending id, column or value. Submissions are written by
:func:`write_predictions`: same header, one row per id sorted by id, floats printed
with enough digits to read back exactly, written atomically.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taemi import EMI_EMOTIONS
from taemi.numeric import require_finite
from taemi.store.clip import check_clip_id

__all__ = ["LabelError", "Labels", "read_labels", "write_predictions"]

log = logging.getLogger(__name__)

#: How many offending ids an error message lists before summarising with a count.
_MAX_LISTED = 5


class LabelError(ValueError):
    """A label file is missing, malformed or inconsistent; the message says where."""


@dataclass(frozen=True)
class Labels:
    """Labels of one split, rows in file order."""

    ids: list[str]  # (N,) clip ids exactly as written in the file ("00042" stays "00042")
    emotions: tuple[str, ...]  # (E,) column names, in the order of ``values`` columns
    values: np.ndarray  # (N, E) float32
    source: str  # the file they were read from (or a description for derived labels)

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape != (len(self.ids), len(self.emotions)):
            raise ValueError(
                f"Labels from {self.source}: values have shape {self.values.shape}, expected "
                f"({len(self.ids)}, {len(self.emotions)}) = (ids, emotions)"
            )
        if self.values.dtype != np.float32:
            raise ValueError(
                f"Labels from {self.source}: values dtype {self.values.dtype}, expected float32"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def check_scorable(self, what: str) -> Labels:
        """Pearson's r needs at least 2 clips: a :class:`LabelError` naming the file
        otherwise (``what``: e.g. ``"validation"``), before any work is done on them."""
        if len(self.ids) < 2:
            raise LabelError(
                f"{self.source}: {len(self.ids)} {what} clip(s); scoring (Pearson r per emotion) needs at least 2"
            )
        return self

    def index(self) -> dict[str, int]:
        """Map each id to its row in ``values``."""
        return {clip_id: i for i, clip_id in enumerate(self.ids)}

    def subset(self, ids: Iterable[str]) -> Labels:
        """The rows of ``ids``, in the order given; raises ``KeyError`` naming unknown ids."""
        wanted = list(ids)
        index = self.index()
        unknown = [clip_id for clip_id in wanted if clip_id not in index]
        if unknown:
            raise KeyError(
                f"{len(unknown)} id(s) not in labels from {self.source}: "
                f"{unknown[:_MAX_LISTED]}{' ...' if len(unknown) > _MAX_LISTED else ''}"
            )
        if len(set(wanted)) != len(wanted):
            dup = sorted({c for c in wanted if wanted.count(c) > 1})[:_MAX_LISTED]
            raise ValueError(f"subset of labels from {self.source}: ids repeated: {dup}")
        rows = np.asarray([index[clip_id] for clip_id in wanted], dtype=np.int64)  # (M,)
        return Labels(
            ids=wanted,
            emotions=self.emotions,
            values=self.values[rows].copy(),  # (M, E)
            source=self.source,
        )


def _check_emotion_names(emotions: Sequence[str], *, what: str) -> tuple[str, ...]:
    names = tuple(emotions)
    if isinstance(emotions, str):
        raise TypeError(
            f"{what}: emotions must be a sequence of names, got the string {emotions!r}"
        )
    if not names:
        raise ValueError(f"{what}: emotions is empty")
    for name in names:
        if not isinstance(name, str) or name == "":
            raise ValueError(f"{what}: emotion name {name!r} is not a non-empty string")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: emotion names repeat: {list(names)}")
    return names


def read_labels(
    path: str | os.PathLike[str],
    *,
    emotions: Sequence[str] | None = EMI_EMOTIONS,
    id_column: str = "Filename",
    value_range: tuple[float, float] | None = (0.0, 1.0),
    store_ids: Container[str] | None = None,
) -> Labels:
    """Read an ABAW-style label CSV.

    Args:
        path: the CSV file (UTF-8, a byte-order mark is tolerated).
        emotions: the value columns to read, in this order; ``None`` takes every column
            other than ``id_column``, in header order (they must then all be numeric).
        id_column: the column holding clip ids; kept as strings.
        value_range: inclusive ``(low, high)`` bounds every value must lie in;
            ``None`` accepts any finite value.
        store_ids: if given, every id must be in it (e.g. a feature store's ids).

    Raises:
        LabelError: on any problem; the message names the file and, for a bad row,
            its 1-based data-row number, its line number, and the bad id/column/value.
    """
    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise LabelError(
            f"{src}: label file not found" + (" (it is a directory)" if p.is_dir() else "")
        )
    wanted = (
        None if emotions is None else _check_emotion_names(emotions, what=f"read_labels({src})")
    )
    if value_range is not None:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not lo <= hi:
            raise ValueError(f"read_labels({src}): value_range {value_range} has low > high")

    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or header == [] or all(h.strip() == "" for h in header):
                raise LabelError(f"{src}: file is empty (no header row)")
            columns = _resolve_columns(src, header, wanted, id_column)
            id_col = header.index(id_column)
            names = tuple(header[c] for c in columns)

            ids: list[str] = []
            rows: list[list[float]] = []
            first_seen: dict[str, tuple[int, int]] = {}  # id -> (data row, line)
            for row in reader:
                if not row:  # blank line
                    continue
                r, line = len(ids) + 1, reader.line_num
                where = f"{src} row {r} (line {line})"
                if len(row) != len(header):
                    raise LabelError(
                        f"{where}: {len(row)} fields, the header has {len(header)}: {row!r}"
                    )
                try:
                    clip_id = check_clip_id(row[id_col], source=where)
                except ValueError as e:
                    raise LabelError(str(e)) from e
                if clip_id in first_seen:
                    r0, line0 = first_seen[clip_id]
                    raise LabelError(
                        f"{where}: duplicate id {clip_id!r}, first seen at row {r0} (line {line0})"
                    )
                first_seen[clip_id] = (r, line)
                rows.append(
                    [_parse_value(row[c], where, clip_id, header[c], value_range) for c in columns]
                )
                ids.append(clip_id)
    except UnicodeDecodeError as e:
        raise LabelError(f"{src}: not valid UTF-8 ({e})") from e
    except csv.Error as e:
        raise LabelError(f"{src}: malformed CSV: {e}") from e

    if not ids:
        raise LabelError(f"{src}: header only, no data rows")
    if store_ids is not None:
        absent = [clip_id for clip_id in ids if clip_id not in store_ids]
        if absent:
            listed = ", ".join(f"{c!r} (row {first_seen[c][0]})" for c in absent[:_MAX_LISTED])
            raise LabelError(
                f"{src}: {len(absent)} of {len(ids)} ids are not in the feature store, e.g. {listed}"
            )
    values = np.asarray(rows, dtype=np.float64).astype(np.float32)  # (N, E)
    log.debug("read %d labels x %d emotions from %s", len(ids), len(names), src)
    return Labels(ids=ids, emotions=names, values=values, source=src)


def _resolve_columns(
    src: str, header: list[str], wanted: tuple[str, ...] | None, id_column: str
) -> list[int]:
    """Indices of the value columns in ``header``; checks the id column and duplicates."""
    repeated = sorted({h for h in header if header.count(h) > 1})
    if id_column not in header:
        raise LabelError(f"{src}: id column {id_column!r} not in header {header!r}")
    if wanted is None:
        if repeated:
            raise LabelError(f"{src}: header repeats column(s) {repeated}")
        cols = [i for i, h in enumerate(header) if h != id_column]
        if not cols:
            raise LabelError(f"{src}: no value columns besides {id_column!r} in header {header!r}")
        return cols
    if id_column in wanted:
        raise LabelError(f"{src}: id column {id_column!r} is also requested as an emotion column")
    missing = [name for name in wanted if name not in header]
    if missing:
        raise LabelError(f"{src}: emotion column(s) {missing} missing; the header has {header!r}")
    clash = [h for h in repeated if h == id_column or h in wanted]
    if clash:
        raise LabelError(f"{src}: header repeats column(s) {clash}")
    return [header.index(name) for name in wanted]


def _parse_value(
    cell: str, where: str, clip_id: str, column: str, value_range: tuple[float, float] | None
) -> float:
    if cell.strip() == "":
        raise LabelError(f"{where}: id {clip_id!r}, column {column!r}: empty cell")
    try:
        v = float(cell)
    except ValueError:
        raise LabelError(
            f"{where}: id {clip_id!r}, column {column!r}: {cell!r} is not a number"
        ) from None
    if not math.isfinite(v):
        raise LabelError(f"{where}: id {clip_id!r}, column {column!r}: {cell!r} is not finite")
    if value_range is not None and not value_range[0] <= v <= value_range[1]:
        raise LabelError(
            f"{where}: id {clip_id!r}, column {column!r}: {cell!r} is outside "
            f"[{value_range[0]}, {value_range[1]}]"
        )
    return v


def _format_value(v: np.floating) -> str:
    """Shortest text that reads back to exactly ``v`` at its dtype's precision, no exponent."""
    return np.format_float_positional(
        v + v.dtype.type(0.0), unique=True, trim="0"
    )  # + 0.0: no "-0.0"


def write_predictions(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    emotions: Sequence[str],
    values: np.ndarray,
    *,
    clip: bool = False,
) -> None:
    """Write predictions as an ABAW submission CSV.

    Header ``Filename,<emotions>``; one row per id, sorted by id as strings. Values are
    printed with the shortest digits that read back exactly (float64 input at float64
    precision, anything narrower at float32 precision). ``clip=True`` clips to [0, 1]
    first. The file is replaced atomically (temporary file + ``os.replace``); parent
    folders are created.

    Args:
        path: the output CSV.
        ids: (N,) clip ids, unique and safe (see ``check_clip_id``).
        emotions: (E,) column names.
        values: (N, E) predictions (numpy, or anything ``np.asarray`` takes).

    Raises:
        ValueError: mismatched shapes, repeated or unsafe ids, NaN or infinite values.
    """
    dst = Path(path)
    names = _check_emotion_names(emotions, what=f"write_predictions({dst})")
    if "Filename" in names:
        raise ValueError(f"write_predictions({dst}): 'Filename' cannot also be an emotion column")
    ids = list(ids)
    for i, clip_id in enumerate(ids):
        check_clip_id(clip_id, source=f"write_predictions({dst}) ids[{i}]")
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})[:_MAX_LISTED]
        raise ValueError(f"write_predictions({dst}): ids repeated: {dup}")

    arr = np.asarray(values)
    if arr.dtype != np.float64:
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"write_predictions({dst}): values dtype {arr.dtype} is not numeric")
        arr = arr.astype(np.float32)  # float16 / ints are exact in float32
    if arr.shape != (len(ids), len(names)):
        raise ValueError(
            f"write_predictions({dst}): values have shape {arr.shape}, expected "
            f"({len(ids)}, {len(names)}) = (ids, emotions)"
        )
    require_finite(
        arr, f"write_predictions({dst}): the values", rows=ids, columns=names, row_word="id"
    )
    if clip:
        arr = np.clip(arr, 0.0, 1.0)

    order = sorted(range(len(ids)), key=lambda i: ids[i])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["Filename", *names])
            for i in order:
                writer.writerow([ids[i], *(_format_value(v) for v in arr[i])])
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info(
        "wrote %d predictions x %d emotions to %s%s",
        len(ids),
        len(names),
        dst,
        " (clipped)" if clip else "",
    )


def concat_labels(a: Labels, b: Labels) -> Labels:
    """Labels of two disjoint splits, one after the other (train on all)."""
    both = sorted(set(a.ids) & set(b.ids))
    if both:
        raise ValueError(f"{len(both)} ids are in both {a.source} and {b.source}, e.g. {both[:5]}")
    return Labels(
        a.ids + b.ids, a.emotions, np.concatenate([a.values, b.values]), f"{a.source} + {b.source}"
    )


def read_ids(
    path: str | os.PathLike[str],
    id_column: str = "Filename",
    *,
    what: str = "id list",
    allow_empty: bool = True,
) -> list[str]:
    """The clip ids of a CSV's ``id_column``, as strings, in file order: a label file, an
    ABAW split file or a plain id list with that header. Other columns are ignored, blank
    lines skipped.

    Raises ``FileNotFoundError`` for a missing file (``what`` names the kind of file) and
    ``ValueError`` naming the file (and row) for a file without the column, a row without
    a value, an invalid or repeated id, text that is not UTF-8 or not CSV, or (unless
    ``allow_empty``) no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{what} {p} does not exist" + (" (it is a folder)" if p.is_dir() else "")
        )
    ids: list[str] = []
    first: dict[str, int] = {}
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header or id_column not in header:
                raise ValueError(f"{p}: no {id_column!r} column (header: {header})")
            col = header.index(id_column)
            for row in reader:
                if not row:
                    continue
                where = f"{p} row {len(ids) + 1} (line {reader.line_num})"
                if len(row) <= col:
                    raise ValueError(f"{where}: {len(row)} fields, no {id_column!r} value: {row!r}")
                clip_id = check_clip_id(row[col], source=where)
                if clip_id in first:
                    raise ValueError(
                        f"{where}: duplicate id {clip_id!r}, first at row {first[clip_id]}"
                    )
                first[clip_id] = len(ids) + 1
                ids.append(clip_id)
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not valid UTF-8 ({e})") from e
    except csv.Error as e:
        raise ValueError(f"{p}: malformed CSV: {e}") from e
    if not ids and not allow_empty:
        raise ValueError(f"{p}: no ids (header only)")
    return ids
