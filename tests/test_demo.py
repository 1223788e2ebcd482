"""The README's main job (`taemi demo`), made small: generated media -> extract -> train -> predict."""

from __future__ import annotations

import json

import pytest

from taemi.cli.main import main
from taemi.data.labels import read_labels


@pytest.mark.slow
def test_demo_runs_the_real_pipeline_end_to_end(tmp_path, capsys) -> None:
    pytest.importorskip(
        "espeakng_loader", reason="the demo corpus speaks through espeakng-loader ([extract] extra)"
    )
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--clips",
            "16",
            "--epochs",
            "2",
            "--max-frames",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "oracle ceiling" in printed and "valid mean Pearson" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"].startswith("generated media")
    assert summary["extract"]["done"] == 16 and summary["extract"]["failed"] == 0
    assert set(summary["seconds"]) == {"media", "extract", "train", "total"}
    assert summary["longest_phase"] in ("media", "extract", "train")
    assert summary["settings"]["share_whisper"] is False
    assert "the longest phase" in printed
    assert summary["store_dims"] == {"audio": 384, "vision": 384, "text": 384}
    assert 0.5 < summary["oracle_mean_pearson"] <= 1.0
    assert summary["clips"]["train"] + summary["clips"]["valid"] == 16
    for name in (
        "media/raw",
        "features/manifest.json",
        "features/transcripts",
        "run/metrics.json",
        "run/plots/learning_curves.png",
        "valid_predictions.csv",
    ):
        assert (out / name).exists(), name
    preds = read_labels(out / "valid_predictions.csv")
    assert len(preds) == summary["clips"]["valid"]
    # a rerun with --resume reuses the corpus, the features and the finished run
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--clips",
                "16",
                "--epochs",
                "2",
                "--max-frames",
                "2",
                "--no-progress",
                "--resume",
            ]
        )
        == 0
    )
    assert json.loads((out / "features" / "extract_summary.json").read_text())["skipped"] == 16


def test_demo_on_synthetic_features(tmp_path) -> None:
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--synthetic-features",
                "--clips",
                "40",
                "--epochs",
                "1",
                "--preset",
                "official",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "synthetic features" and summary["store_dims"]["audio"] == 1027
