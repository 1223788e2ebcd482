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
    settings = summary["settings"]  # the demo's extraction speed settings by default
    assert settings["share_whisper"] is True and settings["image_precision"] == "int8"
    assert settings["whisper_window"] == 10.0 and settings["overrides"] == {
        "train.lr": "2e-3",
        "model.hidden": "64",
        "model.sa_ffn": "256",
        "model.head_hidden": "128",
    }
    assert "the longest phase" in printed
    assert "paper preset (train.lr=2e-3 model.hidden=64 model.sa_ffn=256" in printed
    assert summary["store_dims"] == {"audio": 384, "vision": 384, "text": 384}
    assert 0.5 < summary["oracle_mean_pearson"] <= 1.0
    assert summary["clips"]["train"] + summary["clips"]["valid"] == 16
    assert set(summary["ridge_baselines"]) == {"audio", "vision", "text", "all"}
    assert summary["limits"][0].startswith("time: ") and "ridge regression" in summary["limits"][1]
    assert "limits, score: fusion model" in printed
    for name in (
        "media/raw",
        "features/manifest.json",
        "features/transcripts",
        "run/metrics.json",
        "run/plots/learning_curves.png",
        "valid_predictions.csv",
        "baselines/baselines.json",
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


def test_limits_say_what_bounds_the_demo() -> None:
    from taemi.demo import limits

    summary = {
        "seconds": {"media": 20.0, "extract": 150.0, "train": 60.0, "total": 231.0},
        "longest_phase": "extract",
        "valid": {"mean_pearson": 0.69},
        "oracle_mean_pearson": 0.97,
        "ridge_baselines": {"audio": 0.65, "vision": 0.27, "text": 0.66, "all": 0.70},
    }
    time_line, score_line = limits(summary)
    assert time_line == "time: extract is the longest phase (150 s of 231 s, 65%)"
    assert "ridge regression on the pooled features 0.700" in score_line
    assert "vision 0.270" in score_line and "the features bound the score" in score_line
    summary["valid"]["mean_pearson"] = 0.55  # well below the linear model
    assert "trails a linear model" in limits(summary)[1]
    summary["valid"]["mean_pearson"] = 0.75  # well above it
    above = limits(summary)[1]
    assert "learns 0.050 more than a linear model" in above
    assert "the weakest modality, vision, scores 0.270 alone" in above
    assert limits({**summary, "ridge_baselines": {}, "longest_phase": None}) == []


def test_demo_extraction_settings_from_the_command_line(monkeypatch) -> None:
    """--exact is the exact path; each speed flag given overrides the base it starts from."""
    import taemi.demo

    seen = {}

    def fake_run_demo(out, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(taemi.demo, "run_demo", fake_run_demo)

    def settings(*argv):
        seen.clear()
        with pytest.raises(SystemExit):
            main(["demo", "--out", "unused", *argv])
        return {k: seen[k] for k in ("share_whisper", "image_precision", "whisper_window")}

    fast = {"share_whisper": True, "image_precision": "int8", "whisper_window": 10.0}
    exact = {"share_whisper": False, "image_precision": "fp32", "whisper_window": 30.0}
    assert settings() == fast and seen["clips"] == 720
    assert settings("--exact") == exact
    assert settings("--exact", "--image-precision", "int8") == {**exact, "image_precision": "int8"}
    assert settings("--no-share-whisper", "--whisper-window", "30") == {
        **fast,
        "share_whisper": False,
        "whisper_window": 30.0,
    }
    assert settings("--set", "train.lr=1e-4") == fast and seen["overrides"] == [
        ("train.lr", "1e-4")
    ]
