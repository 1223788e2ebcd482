"""Pearson, CCC and the split metrics (taemi.eval.metrics)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import stats

from taemi import EMI_EMOTIONS
from taemi.eval.metrics import Metrics, ccc, compute_metrics, pearson


def _ccc_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_pearson_matches_scipy_per_column(seed: int, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    n = 200 + 37 * seed
    target = rng.random((n, 6))
    pred = (0.5 * target + rng.normal(0, 0.3, (n, 6))).astype(dtype)
    m = compute_metrics(pred, target, EMI_EMOTIONS)
    expected = [
        stats.pearsonr(pred[:, j].astype(np.float64), target[:, j]).statistic for j in range(6)
    ]
    np.testing.assert_allclose(
        [m.pearson[e] for e in EMI_EMOTIONS], expected, rtol=1e-10, atol=1e-12
    )
    assert m.mean_pearson == pytest.approx(np.mean(expected), rel=1e-10)
    for j in range(6):
        assert pearson(pred[:, j], target[:, j]) == pytest.approx(expected[j], rel=1e-10)


def test_pearson_is_float64_even_for_large_float16_values() -> None:
    rng = np.random.default_rng(5)
    x = (rng.normal(0, 1, 5000) * 200).astype(np.float16)  # sums of squares overflow float16
    y = x.astype(np.float64) + rng.normal(0, 50, 5000)
    r = pearson(x, y)
    assert isinstance(r, float)
    assert r == pytest.approx(stats.pearsonr(x.astype(np.float64), y).statistic, rel=1e-10)


def test_pearson_perfect_and_anti() -> None:
    x = np.linspace(0, 1, 11)
    assert pearson(x, 3 * x + 2) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert -1.0 <= pearson(x, x) <= 1.0


def test_constant_prediction_column_is_zero_with_warning() -> None:
    rng = np.random.default_rng(0)
    target = rng.random((50, 6))
    pred = rng.random((50, 6))
    pred[:, 2] = 0.5
    with pytest.warns(RuntimeWarning, match="'Determination'.*prediction column is constant"):
        m = compute_metrics(pred, target, EMI_EMOTIONS)
    assert m.pearson["Determination"] == 0.0
    assert m.mean_pearson == pytest.approx(np.mean([m.pearson[e] for e in EMI_EMOTIONS]))
    with pytest.warns(RuntimeWarning, match="target column is constant"):
        assert pearson(rng.random(10), np.zeros(10)) == 0.0


def test_no_warning_for_ordinary_columns() -> None:
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics(rng.random((30, 6)), rng.random((30, 6)), EMI_EMOTIONS)


@pytest.mark.parametrize("seed", [0, 1])
def test_ccc_matches_hand_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(100)
    x = 0.8 * y + 0.1 + rng.normal(0, 0.2, 100)
    assert ccc(x, y) == pytest.approx(_ccc_by_hand(x, y), rel=1e-12)


def test_ccc_identical_shifted_scaled() -> None:
    y = np.random.default_rng(0).random(100)
    assert ccc(y, y) == pytest.approx(1.0)
    shifted = ccc(y + 0.2, y)
    assert 0 < shifted < 1
    assert pearson(y + 0.2, y) == pytest.approx(1.0)  # Pearson ignores the shift, CCC does not
    assert ccc(2 * y, y) < 1
    assert ccc(np.full(100, 0.3), y) == 0.0  # constant prediction: zero covariance
    with pytest.warns(RuntimeWarning, match="same constant"):
        assert ccc(np.ones(5), np.ones(5)) == 0.0


def test_mse_and_fields() -> None:
    target = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    pred = np.array([[0.1, 0.8], [1.0, 0.3], [0.5, 0.2]])
    m = compute_metrics(pred, target, ("a", "b"))
    assert m.mse == pytest.approx(np.mean((pred - target) ** 2))
    assert m.mse == pytest.approx((0.01 + 0.04 + 0 + 0.09 + 0 + 0.09) / 6)
    assert m.n == 3 and m.clipped is False
    assert list(m.pearson) == ["a", "b"] and list(m.ccc) == ["a", "b"]
    assert m.mean_ccc == pytest.approx((m.ccc["a"] + m.ccc["b"]) / 2)


def test_clipped_clips_predictions_before_scoring() -> None:
    rng = np.random.default_rng(0)
    target = rng.random((40, 6))
    pred = target * 1.6 - 0.3  # partly outside [0, 1]
    raw = compute_metrics(pred, target, EMI_EMOTIONS)
    clipped = compute_metrics(pred, target, EMI_EMOTIONS, clipped=True)
    ref = compute_metrics(np.clip(pred, 0, 1), target, EMI_EMOTIONS)
    assert raw.clipped is False and clipped.clipped is True
    assert clipped.mse == pytest.approx(ref.mse) and clipped.mse < raw.mse
    assert clipped.pearson == pytest.approx(ref.pearson)
    assert raw.mean_pearson == pytest.approx(1.0)


def test_to_dict_is_json_ready() -> None:
    rng = np.random.default_rng(0)
    m = compute_metrics(rng.random((20, 6)).astype(np.float32), rng.random((20, 6)), EMI_EMOTIONS)
    d = m.to_dict()
    assert set(d) == {"mean_pearson", "pearson", "ccc", "mean_ccc", "mse", "n", "clipped"}
    assert set(d["pearson"]) == set(EMI_EMOTIONS) == set(d["ccc"])
    back = json.loads(json.dumps(d))
    assert back == d
    assert isinstance(m, Metrics)


def test_torch_tensors_accepted() -> None:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    t = torch.rand(30, 6, generator=g)
    p = (t + 0.1 * torch.randn(30, 6, generator=g)).to(torch.bfloat16).float()
    m = compute_metrics(p.numpy(), t.numpy(), EMI_EMOTIONS)
    assert 0.5 < m.mean_pearson <= 1.0


@pytest.mark.parametrize(
    ("pred", "target", "names", "match"),
    [
        (np.zeros((4, 6)), np.zeros((4, 5)), EMI_EMOTIONS, "shape"),
        (np.zeros((4, 6)), np.zeros((4, 6)), EMI_EMOTIONS[:5], "emotion names"),
        (np.zeros(6), np.zeros(6), EMI_EMOTIONS, "2-D"),
        (np.zeros((1, 6)), np.zeros((1, 6)), EMI_EMOTIONS, "at least 2"),
        (np.zeros((4, 2)), np.zeros((4, 2)), ("a", "a"), "unique"),
    ],
)
def test_compute_metrics_rejects_bad_shapes(pred, target, names, match) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(pred, target, names)


def test_nan_rejected_with_position() -> None:
    pred = np.random.default_rng(0).random((5, 6))
    target = pred.copy()
    pred[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"pred has 1 NaN/Inf.*row 3.*'Excitement'"):
        compute_metrics(pred, target, EMI_EMOTIONS)
    target[0, 0] = np.inf
    with pytest.raises(ValueError, match="target"):
        compute_metrics(np.zeros((5, 6)), target, EMI_EMOTIONS)
    with pytest.raises(ValueError, match="non-finite"):
        pearson(np.array([0.0, np.nan, 1.0]), np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="3 values, target 2"):
        ccc(np.zeros(3), np.zeros(2))
