"""The CREMA-D adapter reads emotion names from the header of the real sample's labels.csv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from taemi.data.crema import crema_emotions, read_crema_labels
from taemi.data.labels import LabelError

SAMPLE = Path(
    os.environ.get(
        "TAEMI_CREMA_D", Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample"
    )
)


@pytest.mark.realmedia
def test_real_sample_labels_from_header() -> None:
    if not (SAMPLE / "labels.csv").is_file():
        pytest.skip(f"CREMA-D sample not found at {SAMPLE} (set TAEMI_CREMA_D)")
    labels = read_crema_labels(SAMPLE / "labels.csv")
    assert labels.emotions == ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad")
    assert len(labels) == 12 and labels.ids[0] == "1001_DFA_ANG_XX"
    assert abs(float(labels.values[0, 0]) - 0.368889) < 1e-6


def test_header_parsing(tmp_path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("Filename,media,transcript,Calm,Angry\n00001,a.flv,hi,0.5,0.25\n")
    assert crema_emotions(p) == ("Calm", "Angry")
    assert read_crema_labels(p).ids == ["00001"]
    (tmp_path / "bad.csv").write_text("media,transcript\n")
    with pytest.raises(LabelError, match="Filename"):
        crema_emotions(tmp_path / "bad.csv")
