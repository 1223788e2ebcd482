"""taemi ensemble: equal weights average the members exactly, fitted weights lie on the
simplex and score at least the best member, the submission passes the checker, mismatched
emotions and differing extractions are refused, the JSON records members and weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_main, tiny_cli_sets

from taemi.data.labels import read_ids, read_labels
from taemi.eval.metrics import compute_metrics
from taemi.eval.submission import check_submission
from taemi.experiments.ensemble import (
    check_same_extraction,
    combine,
    describe_members,
    fit_weights,
    project_simplex,
)
from taemi.inference import Predictor
from taemi.store import FeatureStore


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory) -> list[Path]:
    """Three tiny runs on ``synth``: paper seeds 1 and 2, and the concat preset."""
    root = tmp_path_factory.mktemp("ens")
    out = []
    for name, extra in (
        ("s1", ["--set", "train.seed=1"]),
        ("s2", ["--set", "train.seed=2"]),
        ("concat", ["--preset", "concat", "--set", "train.seed=3"]),
    ):
        run = root / name
        argv = ["train", "--store", str(synth.store), "--train", str(synth.train_csv)]
        argv += ["--valid", str(synth.valid_csv), "--out", str(run), "--no-progress"]
        code, _ = run_main(argv + tiny_cli_sets() + extra)
        assert code == 0
        out.append(run)
    return out


def _member_preds(runs, store, ids) -> np.ndarray:
    preds = []
    for r in runs:
        p = Predictor.from_run(r)
        preds.append(p.predict(p.dataset(store, ids=ids)))
    return np.stack(preds)  # (M, N, E)


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return [r[0] for r in rows[1:]], np.array([[float(x) for x in r[1:]] for r in rows[1:]])


def test_equal_weights_are_the_mean_of_the_members(runs, synth, tmp_path) -> None:
    out = tmp_path / "eq"
    argv = ["ensemble", "--runs", *map(str, runs), "--store", str(synth.store)]
    argv += ["--labels", str(synth.valid_csv), "--out", str(out), "--no-clip", "--no-progress"]
    argv += ["--device", "cpu"]
    code, text = run_main(argv)
    assert code == 0, text
    store = FeatureStore(synth.store)
    ids, got = _read_csv(out / "predictions.csv")
    assert ids == sorted(store.ids)
    want = _member_preds(runs, store, ids).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    record = json.loads((out / "ensemble.json").read_text())
    assert record["weighting"] == "equal" and record["weights"] == pytest.approx([1 / 3] * 3)
    assert [m["run"] for m in record["members"]] == [str(r) for r in runs]
    assert [m["preset"] for m in record["members"]] == ["paper", "paper", "concat"]
    assert [m["seed"] for m in record["members"]] == [1, 2, 3]
    assert {m["mode"] for m in record["members"]} == {"frozen"}
    assert record["members"][0]["weights_file"].endswith("best.safetensors")
    labels = read_labels(synth.valid_csv)
    pv = _member_preds(runs, store, labels.ids)
    ens = compute_metrics(pv.astype(np.float64).mean(axis=0), labels.values, labels.emotions)
    assert record["scores"]["ensemble"]["mean_pearson"] == pytest.approx(ens.mean_pearson)
    assert len(record["scores"]["members"]) == 3
    assert "ensemble on" in text and "mean Pearson" in text


def test_fitted_weights_are_on_the_simplex_and_beat_the_best_member(runs, synth, tmp_path) -> None:
    out = tmp_path / "fit"
    ids_csv = tmp_path / "test_ids.csv"
    test_ids = read_ids(synth.train_csv)[:20]
    ids_csv.write_text("Filename\n" + "\n".join(test_ids) + "\n")
    argv = ["ensemble", "--runs", *map(str, runs), "--store", str(synth.store), "--device", "cpu"]
    argv += ["--labels", str(synth.valid_csv), "--weights", "fit", "--ids", str(ids_csv)]
    argv += ["--out", str(out), "--no-progress"]
    code, text = run_main(argv)
    assert code == 0, text
    record = json.loads((out / "ensemble.json").read_text())
    w = np.array(record["weights"])
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
    scores = record["scores"]
    best = max(m["mean_pearson"] for m in scores["members"])
    assert scores["ensemble"]["mean_pearson"] >= best - 1e-12
    assert record["fit"]["objective"] == "mean Pearson r" and "in-sample" in record["fit"]["note"]

    check = check_submission(out / "predictions.csv", test_ids)
    assert check.ok, check.problems
    code, _ = run_main(["check-submission", str(out / "predictions.csv"), "--ids", str(ids_csv)])
    assert code == 0


def test_fit_weights_never_loses_to_a_member() -> None:
    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, 3))
    for trial in range(5):
        noise = rng.normal(size=(4, 50, 3)) * rng.uniform(0.5, 3.0, size=(4, 1, 1))
        preds = target[None] * rng.uniform(0.2, 1.0, size=(4, 1, 1)) + noise
        w, fit = fit_weights(preds, target)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        score = compute_metrics(combine(preds, w), target, ("a", "b", "c")).mean_pearson
        members = [compute_metrics(p, target, ("a", "b", "c")).mean_pearson for p in preds]
        assert score >= max(members) - 1e-12
        assert fit["score"] == pytest.approx(score)
    # independent, equally good members: averaging helps, so the weights leave the vertex
    preds = target[None] + rng.normal(size=(3, 50, 3))
    w, _ = fit_weights(preds, target)
    assert (w > 0.1).all()


def test_project_simplex() -> None:
    np.testing.assert_allclose(project_simplex(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_simplex(np.array([5.0, 0.0, -1.0])), [1.0, 0.0, 0.0])
    w = project_simplex(np.array([0.9, 0.8, -3.0]))
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_mismatched_emotions_are_refused(runs, synth, tmp_path) -> None:
    other = _copy_run(runs[0], tmp_path / "other")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["emotions"] = list(reversed(cfg["data"]["emotions"]))
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="different emotions") as e:
        describe_members([runs[0], other])
    assert str(runs[0]) in str(e.value) and str(other) in str(e.value)
    code, _ = run_main(
        [
            "ensemble",
            "--runs",
            str(runs[0]),
            str(other),
            "--store",
            str(synth.store),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="at least 2 runs"):
        describe_members([runs[0]])


def _features(profile: str, max_frames: int) -> dict:
    def mod(backbone, settings):
        return {"backbone": backbone, "settings": {"profile": profile, **settings}}

    return {
        "dims": {"audio": 12, "vision": 10, "text": 8},
        "dtype": "float16",
        "text_tokens": False,
        "modalities": {
            "audio": mod("wav", {"max_seconds": 12.0}),
            "vision": mod(
                "img", {"max_frames": max_frames, "frame_policy": "uniform", "face": None}
            ),
            "text": mod("txt", {"token_states": False, "asr": "whisper"}),
        },
    }


def test_media_needs_one_extraction(runs, tmp_path) -> None:
    a = _copy_run(runs[0], tmp_path / "a")
    b = _copy_run(runs[1], tmp_path / "b")
    (a / "features.json").write_text(json.dumps(_features("offline", 8)))
    (b / "features.json").write_text(json.dumps(_features("offline", 16)))
    members = describe_members([a, b])
    with pytest.raises(ValueError, match="different extractions") as e:
        check_same_extraction(members)
    assert "max_frames" in str(e.value) and str(a) in str(e.value)
    (b / "features.json").write_text(json.dumps(_features("offline", 8)))
    assert check_same_extraction(members)["profile"] == "offline"
    # the synthetic store's features cannot be extracted from media at all
    with pytest.raises(ValueError, match="cannot be extracted from media"):
        check_same_extraction(describe_members(runs[:2]))
    code, _ = run_main(
        [
            "ensemble",
            "--runs",
            str(a),
            str(b),
            "--out",
            str(tmp_path / "m"),
            "--",
            str(tmp_path / "no.mp4"),
        ]
    )
    assert code == 2  # the clip does not exist
