"""Paired bootstrap of the challenge score and the ``taemi compare`` command."""

from __future__ import annotations

import argparse
import json
import math
import warnings

import numpy as np
import pytest

from taemi.cli.compare_cmd import register
from taemi.data.labels import write_predictions
from taemi.eval.metrics import compute_metrics
from taemi.eval.stats import paired_bootstrap, resampled_mean_pearson, seed_spread

# pred = target + N(0, s^2) with target ~ N(0, 1): population Pearson 1 / sqrt(1 + s^2)
NOISE_A = np.array([1.0, 0.5])
NOISE_B = np.array([1.5, 0.8])
TRUE_DIFF = float(np.mean(1 / np.sqrt(1 + NOISE_A**2) - 1 / np.sqrt(1 + NOISE_B**2)))


def _sample(rng: np.random.Generator, n: int, noise_a=NOISE_A, noise_b=NOISE_B):
    t = rng.standard_normal((n, len(noise_a)))  # (N, E)
    a = t + rng.standard_normal(t.shape) * noise_a
    b = t + rng.standard_normal(t.shape) * noise_b
    return a, b, t


def test_ci_covers_true_difference_at_nominal_rate():
    rng = np.random.default_rng(12345)
    trials, covered = 200, 0
    for k in range(trials):
        a, b, t = _sample(rng, 200)
        res = paired_bootstrap(a, b, t, n_boot=300, seed=k)
        covered += res.ci_low <= TRUE_DIFF <= res.ci_high
    assert 0.88 <= covered / trials <= 0.99, (
        f"coverage {covered / trials:.3f} (true diff {TRUE_DIFF:.4f})"
    )


def test_identical_predictors_give_zero_difference():
    a, _, t = _sample(np.random.default_rng(0), 100)
    res = paired_bootstrap(a, a.copy(), t, n_boot=200)
    assert res.diff == 0.0 and res.ci_low <= 0.0 <= res.ci_high
    assert res.p_value == 1.0
    assert res.mean_a == res.mean_b


def test_much_better_predictor_is_significant():
    a, b, t = _sample(
        np.random.default_rng(1), 300, noise_a=np.array([0.2, 0.2]), noise_b=np.array([2.0, 2.0])
    )
    res = paired_bootstrap(a, b, t, n_boot=500)
    assert res.diff > 0 and res.ci_low > 0
    assert res.p_value < 0.01
    flipped = paired_bootstrap(b, a, t, n_boot=500)
    assert flipped.ci_high < 0 and flipped.p_value < 0.01


def test_point_estimates_match_the_challenge_metric_and_seed_is_reproducible():
    a, b, t = _sample(np.random.default_rng(2), 50)
    res = paired_bootstrap(a, b, t, n_boot=100, seed=7)
    assert res.mean_a == pytest.approx(compute_metrics(a, t, ["x", "y"]).mean_pearson, abs=1e-12)
    assert res.mean_b == pytest.approx(compute_metrics(b, t, ["x", "y"]).mean_pearson, abs=1e-12)
    assert res == paired_bootstrap(a, b, t, n_boot=100, seed=7)
    assert res.n == 50 and res.n_boot == 100
    identity = resampled_mean_pearson([a, b], t, np.arange(50)[None])  # (2, 1)
    np.testing.assert_allclose(identity[:, 0], [res.mean_a, res.mean_b], atol=1e-12)


def test_constant_columns_score_zero_without_a_warning_per_resample():
    rng = np.random.default_rng(3)
    t = rng.random((4, 2))
    a = rng.random((4, 2))
    a[:, 1] = 0.5  # constant prediction column: the full-split pearson warns once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = paired_bootstrap(a, rng.random((4, 2)), t, n_boot=500)
    assert len(caught) == 1 and "constant" in str(caught[0].message)
    assert np.isfinite([res.ci_low, res.ci_high, res.p_value]).all()
    # a resample drawing one clip N times: everything constant -> 0
    assert resampled_mean_pearson([a], t, np.zeros((1, 4), dtype=int))[0, 0] == 0.0


def test_bad_inputs_raise():
    a, b, t = _sample(np.random.default_rng(4), 10)
    with pytest.raises(ValueError, match="shapes differ"):
        paired_bootstrap(a[:9], b, t)
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap(np.where(a > 1, np.nan, a), b, t)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(a, b, t, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        paired_bootstrap(a, b, t, alpha=1.5)


def test_seed_spread():
    mean, std, n = seed_spread([0.50, 0.52, 0.54])
    assert mean == pytest.approx(0.52) and std == pytest.approx(0.02) and n == 3
    assert math.isnan(seed_spread([0.5])[1])
    with pytest.raises(ValueError):
        seed_spread([])


# --------------------------------------------------------------------------- CLI

EMOTIONS = ("Joy", "Sadness")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taemi")
    sub = p.add_subparsers(dest="command")
    register(sub, lambda sp: sp.add_argument("--no-progress", action="store_true"))
    return p


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(5)
    n = 60
    ids = [f"{i:05d}" for i in range(n)]
    t = rng.random((n, 2))
    a = t + rng.normal(0, 0.05, t.shape)  # A: good
    b = t + rng.normal(0, 0.6, t.shape)  # B: poor
    write_predictions(tmp_path / "labels.csv", ids, EMOTIONS, t.astype(np.float32))
    write_predictions(tmp_path / "run_a" / "valid_predictions.csv", ids, EMOTIONS, a)
    # B written with its ids reversed and its columns swapped: compare must realign them
    write_predictions(
        tmp_path / "run_b" / "valid_predictions.csv", ids[::-1], EMOTIONS[::-1], b[::-1, ::-1]
    )
    return tmp_path, t.astype(np.float32).astype(np.float64), b


def test_compare_cli_prints_and_writes_json(runs, capsys):
    runs, t, b = runs
    out_json = runs / "cmp.json"
    args = _parser().parse_args(
        [
            "compare",
            str(runs / "run_a"),
            str(runs / "run_b"),
            "--labels",
            str(runs / "labels.csv"),
            "--n-boot",
            "200",
            "--seed",
            "3",
            "--out",
            str(out_json),
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "Joy" in text and "Sadness" in text and "95% CI" in text
    report = json.loads(out_json.read_text())
    assert report["n"] == 60 and report["n_boot"] == 200
    assert report["diff"] > 0 and report["ci_low"] > 0
    assert set(report["pearson_a"]) == set(EMOTIONS)
    assert report["mean_a"] == pytest.approx(np.mean(list(report["pearson_a"].values())))
    # B was realigned to A's rows and columns
    expected_b = compute_metrics(b, t, EMOTIONS).pearson
    assert report["pearson_b"] == pytest.approx(expected_b, abs=1e-6)  # read back as float32


def test_compare_cli_names_differing_ids(runs):
    runs = runs[0]
    rng = np.random.default_rng(6)
    ids = [f"{i:05d}" for i in range(1, 61)]  # drops 00000, adds 00060
    write_predictions(runs / "run_b" / "valid_predictions.csv", ids, EMOTIONS, rng.random((60, 2)))
    args = _parser().parse_args(
        ["compare", str(runs / "run_a"), str(runs / "run_b"), "--labels", str(runs / "labels.csv")]
    )
    with pytest.raises(ValueError, match=r"different clips.*'00000'.*'00060'"):
        args.func(args)


def test_compare_cli_missing_predictions(runs):
    runs = runs[0]
    (runs / "run_c").mkdir()
    args = _parser().parse_args(
        ["compare", str(runs / "run_a"), str(runs / "run_c"), "--labels", str(runs / "labels.csv")]
    )
    with pytest.raises(FileNotFoundError, match="valid_predictions.csv"):
        args.func(args)
