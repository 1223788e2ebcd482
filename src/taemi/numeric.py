"""Checks on arrays of numbers that several layers share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def require_finite(
    a: np.ndarray,
    what: str,
    *,
    rows: Sequence[object] | None = None,
    columns: Sequence[object] | None = None,
    row_word: str = "row",
    column_word: str = "column",
) -> None:
    """Raise ValueError when ``a`` (1-D or 2-D) holds NaN/Inf, naming how many and the
    first one: ``"{what} has 3 NaN/Inf (non-finite) value(s), first at row 4, column
    'Joy': nan"``. ``rows`` / ``columns`` name the positions (ids, emotions); without
    them the index is given."""
    bad = ~np.isfinite(a)
    if not bad.any():
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    parts = [f"{row_word} {rows[where[0]]!r}" if rows is not None else f"{row_word} {where[0]}"]
    if len(where) == 2:
        parts.append(
            f"{column_word} {columns[where[1]]!r}"
            if columns is not None
            else f"{column_word} {where[1]}"
        )
    raise ValueError(
        f"{what} has {int(bad.sum())} NaN/Inf (non-finite) value(s), first at {', '.join(parts)}: {a[where]}"
    )
