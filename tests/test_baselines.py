"""Simple baselines (taemi.experiments.baselines): ridge recovers a known linear target,
the regularisation follows the noise, pooling ignores padding, a missing modality is
zeros plus its indicator, and the command, the ablation grid and the report show them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import is_png, run_main, split_args

from taemi import MODALITIES
from taemi.data.labels import Labels
from taemi.experiments.baselines import (
    BaselineSettings,
    Standardiser,
    fit_ridge,
    pool_store,
    ridge_path,
    run_baselines,
)
from taemi.experiments.report import build_report
from taemi.store import FeatureStore, StoreWriter
from taemi.store.clip import ClipFeatures

DIMS = {"audio": 6, "vision": 5, "text": 4}
EMOTIONS = ("a", "b", "c")
RIDGE_ONLY = BaselineSettings(models=("ridge",))


def _write_store(root: Path, n: int, seed: int, missing_audio: frozenset[int] = frozenset()):
    """A float32 store of n clips with sequences of 2-15 steps; returns the store."""
    rng = np.random.default_rng(seed)
    with StoreWriter(root, dims=DIMS, dtype="float32") as w:
        for i in range(n):
            audio = rng.normal(size=(int(rng.integers(2, 16)), DIMS["audio"])) + rng.normal()
            vision = rng.normal(size=(int(rng.integers(2, 16)), DIMS["vision"]))
            text = rng.normal(size=DIMS["text"])
            w.add(
                ClipFeatures(
                    f"c{i:04d}",
                    None if i in missing_audio else audio.astype(np.float32),
                    vision.astype(np.float32),
                    text.astype(np.float32),
                )
            )
    return FeatureStore(root)


@pytest.fixture(scope="module")
def linear_store(tmp_path_factory) -> FeatureStore:
    return _write_store(tmp_path_factory.mktemp("linear") / "store", 300, seed=0)


def _linear_labels(store: FeatureStore, noise: float, seed: int) -> tuple[Labels, Labels]:
    """Targets = a fixed linear map of the pooled features of all modalities (+ noise);
    the first 200 clips train, the rest validate."""
    pooled = pool_store(store, store.ids)
    x = np.concatenate([pooled.values[m] for m in MODALITIES], axis=1)  # (N, 15)
    rng = np.random.default_rng(seed)
    y = x @ rng.normal(size=(x.shape[1], len(EMOTIONS))) + noise * rng.normal(
        size=(len(x), len(EMOTIONS))
    )
    ids = list(store.ids)
    mk = lambda sl, name: Labels(ids[sl], EMOTIONS, y[sl].astype(np.float32), name)
    return mk(slice(0, 200), "train"), mk(slice(200, None), "valid")


def _result(results, name):
    (r,) = [r for r in results if r.name == name]
    return r


def test_ridge_recovers_a_linear_target_and_beats_shuffled_labels(linear_store) -> None:
    train, valid = _linear_labels(linear_store, noise=0.01, seed=1)
    results = run_baselines(linear_store, train, valid, RIDGE_ONLY)
    assert [r.name for r in results] == [f"ridge_{f}" for f in ("audio", "vision", "text", "all")]
    full = _result(results, "ridge_all")
    assert full.valid["mean_pearson"] > 0.99
    assert all(r > 0.98 for r in full.valid["pearson"].values())
    assert full.seed is None and set(full.hyper) == {"alpha"}
    assert full.n_features == sum(DIMS.values()) + 3  # + one missing indicator per modality
    # each modality alone explains only its part
    assert max(_result(results, f"ridge_{m}").valid["mean_pearson"] for m in MODALITIES) < 0.9

    perm = np.random.default_rng(5).permutation(len(train))
    shuffled = Labels(train.ids, EMOTIONS, train.values[perm], "shuffled")
    control = _result(run_baselines(linear_store, shuffled, valid, RIDGE_ONLY), "ridge_all")
    assert control.valid["mean_pearson"] < 0.3 < full.valid["mean_pearson"]


def test_ridge_path_is_the_closed_form_in_both_shapes() -> None:
    rng = np.random.default_rng(0)
    for n, p in ((40, 10), (10, 40)):  # primal and dual forms
        x, y, xe = rng.normal(size=(n, p)), rng.normal(size=(n, 2)), rng.normal(size=(5, p))
        mx, my = x.mean(0), y.mean(0)
        xc = x - mx
        w = np.linalg.solve(xc.T @ xc + 2.0 * np.eye(p), xc.T @ (y - my))
        np.testing.assert_allclose(ridge_path(x, y, xe, [2.0])[0], (xe - mx) @ w + my, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_grows_with_the_noise(seed) -> None:
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=(40, 2))
    xt, xv = rng.normal(size=(60, 40)), rng.normal(size=(300, 40))
    chosen = []
    for noise in (0.1, 20.0):
        yt = xt @ beta + noise * rng.normal(size=(60, 2))
        yv = xv @ beta + noise * rng.normal(size=(300, 2))
        alpha, pred, search = fit_ridge(xt, yt, xv, yv, RIDGE_ONLY.alphas)
        assert len(search) == len(RIDGE_ONLY.alphas) and pred.shape == yv.shape
        chosen.append(alpha)
    assert chosen[1] >= 100 * chosen[0]


def test_pooling_is_the_mean_of_the_valid_steps_only(linear_store) -> None:
    ids = list(linear_store.ids[:20])
    pooled = pool_store(linear_store, ids)
    lengths = [len(linear_store.get(i).audio) for i in ids]
    assert len(set(lengths)) > 1  # clips of different lengths
    t_max = max(lengths)
    for k, clip_id in enumerate(ids):
        clip = linear_store.get(clip_id)
        hand = clip.audio.astype(np.float64).sum(axis=0) / len(clip.audio)
        np.testing.assert_allclose(pooled.values["audio"][k], hand, rtol=1e-12)
        np.testing.assert_allclose(pooled.values["text"][k], clip.text, rtol=1e-6)
        if len(clip.audio) < t_max:  # a mean over zero-padded steps would be diluted
            padded = np.zeros((t_max, DIMS["audio"]))
            padded[: len(clip.audio)] = clip.audio
            assert not np.allclose(pooled.values["audio"][k], padded.mean(axis=0))


def test_missing_modality_is_zeros_and_an_indicator(tmp_path) -> None:
    gone = frozenset({3, 7, 11, 150, 250})
    store = _write_store(tmp_path / "store", 300, seed=2, missing_audio=gone)
    pooled = pool_store(store, store.ids)
    assert sorted(np.nonzero(pooled.missing["audio"])[0]) == sorted(gone)
    assert not pooled.missing["vision"].any() and not pooled.missing["text"].any()
    std = Standardiser.fit(pool_store(store, store.ids[:200]))
    x = std.matrix(pooled, "audio")  # (N, 6 + 1)
    assert x.shape == (300, DIMS["audio"] + 1)
    for i in range(300):
        if i in gone:
            assert (x[i, :-1] == 0).all() and x[i, -1] == 1.0
        else:
            assert x[i, -1] == 0.0 and np.abs(x[i, :-1]).sum() > 0
    # standardised with the training clips where audio is present
    present = [i for i in range(200) if i not in gone]
    np.testing.assert_allclose(x[present, :-1].mean(axis=0), 0.0, atol=1e-12)
    train, valid = _linear_labels(store, noise=0.01, seed=1)
    results = run_baselines(store, train, valid, BaselineSettings(feature_sets=("audio", "all")))
    assert all(np.isfinite(r.valid["mean_pearson"]) for r in results)


def test_mlp_is_deterministic_given_its_seed(linear_store) -> None:
    train, valid = _linear_labels(linear_store, noise=0.01, seed=1)
    settings = BaselineSettings(
        models=("mlp",), feature_sets=("all",), mlp_hidden=16, mlp_max_epochs=6
    )
    a, b = (run_baselines(linear_store, train, valid, settings, seeds=(7, 8)) for _ in range(2))
    assert [r.valid for r in a] == [r.valid for r in b]
    assert [r.seed for r in a] == [7, 8]
    assert set(a[0].hyper) == {"weight_decay", "epochs"}
    assert a[0].hyper["weight_decay"] in settings.mlp_weight_decays


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="models"):
        BaselineSettings(models=("forest",))
    with pytest.raises(ValueError, match="alphas"):
        BaselineSettings(alphas=(0.0, 1.0))
    with pytest.raises(ValueError, match="mlp_hidden"):
        BaselineSettings(mlp_hidden=0)


def test_cli_writes_its_files_and_the_report_shows_them(synth, tmp_path) -> None:
    out = tmp_path / "base"
    code, text = run_main(
        [
            "baselines",
            *split_args(synth, out),
            "--features",
            "text,all",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "ridge_all" in text and "(deterministic)" in text
    assert is_png(out / "baselines.png")
    data = json.loads((out / "baselines.json").read_text())
    assert [s["name"] for s in data["summary"]] == [
        "ridge_text",
        "mlp_text",
        "ridge_all",
        "mlp_all",
    ]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["models"] == ["ridge", "mlp"] and settings["seeds"] == [3407]
    with open(out / "baselines.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {"mean_pearson", "ccc_Joy", "hyperparameter"} <= set(rows[0])

    html = build_report([out], out_html=tmp_path / "r.html", out_md=tmp_path / "r.md")
    assert "Simple baselines" in html and "ridge_all" in html and "deterministic" in html
    md = (tmp_path / "r.md").read_text()
    assert "| ridge_all |" in md and "best simple model" in md

    code, _ = run_main(
        [
            "baselines",
            *split_args(synth, out),
            "--models",
            "lasso",
        ]
    )
    assert code == 2


def test_ablate_baselines_grid_adds_simple_rows(synth, tmp_path, monkeypatch) -> None:
    import taemi.experiments.ablate as ab

    def fake_run(job):  # the TAEMI variants are tested in test_ablate; here: the simple rows
        valid = {
            "mean_pearson": 0.1,
            "pearson": dict.fromkeys(
                ("Admiration", "Amusement", "Determination", "Empathic Pain", "Excitement", "Joy"),
                0.1,
            ),
        }
        return ab._row(job, 1, valid)

    monkeypatch.setattr(ab, "_run_one", fake_run)
    out = tmp_path / "grid"
    rows = ab.ablate(synth.store, synth.train_csv, synth.valid_csv, out, grid="baselines", seeds=2)
    names = [r["variant"] for r in rows]
    assert names.count("ridge_all") == 1 and names.count("mlp_all") == 2
    assert names.count("audio_only") == 2
    with open(out / "results.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == len(rows)
    summary = (out / "summary.md").read_text()
    assert "| ridge_text | 1 |" in summary and "(deterministic)" in summary
    assert "| mlp_text | 2 |" in summary
    assert (out / "baselines" / "baselines.json").is_file()
    html = build_report([out])
    assert "Simple baselines" in html
    # --grid all leaves them out (documented)
    assert ab.simple_baselines("all") == () and ab.simple_baselines("table3") == ()
