"""CREMA-D adapter: the sample's ``labels.csv`` with emotion names from its header.

Cao et al., "CREMA-D: Crowd-sourced Emotional Multimodal Actors Dataset", IEEE Trans.
Affective Computing 5(4), 2014 (ODbL 1.0 / DbCL 1.0). The sample's ``labels.csv`` has
``Filename, media, rating_mode, numResponses, transcript`` followed by one intensity
column per emotion; every column after the metadata is an emotion, in header order.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from taemi.data.labels import LabelError, Labels, read_labels

#: Non-emotion columns of the CREMA-D sample's labels.csv.
META_COLUMNS = ("Filename", "media", "rating_mode", "numResponses", "transcript")


def crema_emotions(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The emotion columns of a CREMA-D labels file: its header minus :data:`META_COLUMNS`."""
    p = Path(path)
    with open(p, newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), None)
    if not header or "Filename" not in header:
        raise LabelError(f"{p}: no header with a Filename column")
    emotions = tuple(c for c in header if c not in META_COLUMNS)
    if not emotions:
        raise LabelError(f"{p}: no emotion columns besides {META_COLUMNS}")
    return emotions


def read_crema_labels(path: str | os.PathLike[str], **kwargs) -> Labels:
    """:func:`taemi.data.labels.read_labels` with the emotions taken from the header."""
    return read_labels(path, emotions=crema_emotions(path), **kwargs)
