"""Synthetic feature stores (taemi.synth.features)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from taemi import EMI_EMOTIONS
from taemi.data.labels import read_labels
from taemi.eval.metrics import compute_metrics
from taemi.synth import features as synth
from taemi.synth.features import SynthConfig, draw_truth, make_patterns, make_synth, render_clip

FeatureStore = pytest.importorskip("taemi.store", reason="taemi.store not available").FeatureStore

SMALL = {"clips": 40, "dims": (12, 10, 8), "audio_len": (5, 15), "vision_len": (5, 15)}


def _store_arrays(root: Path) -> dict[str, tuple]:
    store = FeatureStore(root)
    out = {}
    for clip_id in store.ids:
        c = store.get(clip_id)
        out[clip_id] = tuple(
            None if a is None else np.array(a) for a in (c.audio, c.vision, c.text, c.text_tokens)
        )
    return out


def _assert_same_store(a: Path, b: Path) -> None:
    sa, sb = _store_arrays(a), _store_arrays(b)
    assert sorted(sa) == sorted(sb)
    for clip_id in sa:
        for x, y in zip(sa[clip_id], sb[clip_id]):
            assert (x is None) == (y is None), clip_id
            if x is not None:
                np.testing.assert_array_equal(x, y, err_msg=clip_id)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, synth.SynthResult]:
    """400 tiny clips with noticeable missing rates (shared by several tests)."""
    cfg = SynthConfig(
        clips=400,
        dims=(12, 10, 8),
        audio_len=(20, 30),
        vision_len=(10, 20),
        missing_rate=(0.2, 0.3, 0.1),
        label_noise=0.05,
        seed=7,
    )
    return cfg, make_synth(tmp_path_factory.mktemp("big"), cfg, progress=False)


def test_files_and_labels(tmp_path: Path) -> None:
    cfg = SynthConfig(**SMALL, text_tokens=True)
    res = make_synth(tmp_path, cfg, progress=False)
    assert res.store == tmp_path / "store" and res.store.is_dir()
    assert (tmp_path / "synth.json").is_file()
    assert res.n_train == 30 and res.n_valid == 10
    train, valid = read_labels(res.train_csv), read_labels(res.valid_csv)
    assert train.emotions == EMI_EMOTIONS
    assert train.ids == [f"{i:05d}" for i in range(30)]
    assert valid.ids == [f"{i:05d}" for i in range(30, 40)]
    for lab in (train, valid):
        assert ((lab.values >= 0) & (lab.values <= 1)).all()
        assert all(len(i) == 5 and i.isdigit() for i in lab.ids)
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["config"]["clips"] == 40 and meta["oracle"] == res.oracle

    store = FeatureStore(res.store)
    assert len(store) == 40 and sorted(store.ids) == [f"{i:05d}" for i in range(40)]
    for clip_id in store.ids:
        c = store.get(clip_id)
        truth = draw_truth(cfg, int(clip_id))
        assert c.missing == truth.missing
        if c.audio is not None:
            assert c.audio.shape == (truth.lengths["audio"], 12) and c.audio.dtype == np.float16
        if c.vision is not None:
            assert c.vision.shape == (truth.lengths["vision"], 10)
        if c.text is not None:
            assert c.text.shape == (8,)
            tokens = np.asarray(c.text_tokens, dtype=np.float32)
            assert tokens.shape == (truth.lengths["text"], 8)
            np.testing.assert_allclose(tokens.mean(0), np.asarray(c.text, np.float32), atol=2e-2)


def test_custom_emotions(tmp_path: Path) -> None:
    cfg = SynthConfig(**SMALL, emotions=("Anger", "Joy"))
    res = make_synth(tmp_path, cfg, progress=False)
    assert read_labels(res.valid_csv, emotions=None).emotions == ("Anger", "Joy")


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    cfg = SynthConfig(**SMALL)
    a = make_synth(tmp_path / "a", cfg, progress=False)
    b = make_synth(tmp_path / "b", cfg, progress=False)
    c = make_synth(tmp_path / "c", SynthConfig(**SMALL, seed=1), progress=False)
    for name in ("train.csv", "valid.csv", "synth.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    _assert_same_store(a.store, b.store)
    assert (tmp_path / "a" / "train.csv").read_bytes() != (
        tmp_path / "c" / "train.csv"
    ).read_bytes()
    x, y = _store_arrays(a.store)["00000"], _store_arrays(c.store)["00000"]
    assert any(
        p is not None and q is not None and (p.shape != q.shape or (p != q).any())
        for p, q in zip(x, y)
    )


def test_resume_after_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SynthConfig(**SMALL)
    ref = make_synth(tmp_path / "ref", cfg, progress=False)

    real_render = synth.render_clip
    calls = {"n": 0}

    def flaky(cfg_, truth, patterns):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt("simulated interruption")
        return real_render(cfg_, truth, patterns)

    monkeypatch.setattr(synth, "render_clip", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_synth(tmp_path / "run", cfg, progress=False)
    monkeypatch.setattr(synth, "render_clip", real_render)
    partial = (
        len(FeatureStore(tmp_path / "run" / "store"))
        if (tmp_path / "run" / "store").exists()
        else 0
    )

    counted = {"n": 0}

    def counting(cfg_, truth, patterns):
        counted["n"] += 1
        return real_render(cfg_, truth, patterns)

    monkeypatch.setattr(synth, "render_clip", counting)
    res = make_synth(tmp_path / "run", cfg, progress=False)
    assert counted["n"] == 40 - partial  # only the absent clips are generated
    for name in ("train.csv", "valid.csv", "synth.json"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "run" / name).read_bytes()
    _assert_same_store(ref.store, res.store)


def test_resume_refuses_other_config(tmp_path: Path) -> None:
    make_synth(tmp_path, SynthConfig(**SMALL), progress=False)
    with pytest.raises(ValueError, match="seed"):
        make_synth(tmp_path, SynthConfig(**SMALL, seed=3), progress=False)


def test_missing_rates_respected(big) -> None:
    cfg, res = big
    store = FeatureStore(res.store)
    missing = np.asarray(store.missing, dtype=bool)  # (N, 3) audio, vision, text
    assert missing.shape == (400, 3)
    np.testing.assert_allclose(missing.mean(0), cfg.missing_rate, atol=0.08)
    meta = json.loads((res.store.parent / "synth.json").read_text())
    np.testing.assert_allclose(list(meta["missing_fraction"].values()), missing.mean(0))


def test_oracle(big) -> None:
    _, res = big
    full, obs = res.oracle["mean_pearson"], res.oracle["mean_pearson_observable"]
    assert full > 0.8
    assert obs <= full
    assert obs > 0.5


def test_no_missing_means_equal_oracles(tmp_path: Path) -> None:
    res = make_synth(
        tmp_path, SynthConfig(**SMALL, missing_rate=(0, 0, 0), label_noise=0.0), progress=False
    )
    assert res.oracle["mean_pearson"] == pytest.approx(1.0, abs=1e-6)
    assert res.oracle["mean_pearson_observable"] == res.oracle["mean_pearson"]


def test_evidence_is_time_localised() -> None:
    cfg = SynthConfig(
        clips=300,
        dims=(64, 48, 16),
        audio_len=(40, 60),
        vision_len=(40, 60),
        missing_rate=(0, 0, 0),
        corrupt_rate=0.0,
        seed=3,
    )
    pat = make_patterns(cfg)
    decode = np.linalg.pinv(pat.audio_mix)  # (E, D_a)
    u, inside, outside, pooled = [], [], [], []
    for i in range(cfg.clips):
        truth = draw_truth(cfg, i)
        audio = render_clip(cfg, truth, pat).audio.astype(np.float64)  # (T, D_a)
        start, stop = truth.window["audio"]
        assert 0.1 * len(audio) - 1 <= stop - start <= 0.2 * len(audio) + 1
        mask = np.zeros(len(audio), bool)
        mask[start:stop] = True
        u.append(truth.u_audio)
        inside.append(audio[mask].mean(0) @ decode.T)  # (E,)
        outside.append(audio[~mask].mean(0) @ decode.T)
        pooled.append(audio.mean(0) @ decode.T)  # what mean pooling sees
    u, inside, outside, pooled = map(np.asarray, (u, inside, outside, pooled))
    r_in = compute_metrics(inside, u, cfg.emotions).mean_pearson
    r_out = compute_metrics(outside, u, cfg.emotions).mean_pearson
    r_pooled = compute_metrics(pooled, u, cfg.emotions).mean_pearson
    assert r_in > 0.8
    assert abs(r_out) < 0.2
    assert r_pooled < 0.5  # the unrelated expression outside the window swamps the evidence


def test_without_distractor_mean_pooling_is_only_diluted() -> None:
    cfg = SynthConfig(
        clips=300,
        dims=(64, 48, 16),
        audio_len=(40, 60),
        missing_rate=(0, 0, 0),
        corrupt_rate=0.0,
        distractor=0.0,
        seed=3,
    )
    pat = make_patterns(cfg)
    decode = np.linalg.pinv(pat.audio_mix)  # (E, D_a)
    truths = [draw_truth(cfg, i) for i in range(cfg.clips)]
    pooled = np.asarray(
        [render_clip(cfg, t, pat).audio.astype(np.float64).mean(0) @ decode.T for t in truths]
    )
    u = np.asarray([t.u_audio for t in truths])
    assert compute_metrics(pooled, u, cfg.emotions).mean_pearson > 0.6


def test_corruption_spans_avoid_evidence() -> None:
    cfg = SynthConfig(
        clips=200, dims=(8, 8, 4), audio_len=(5, 40), vision_len=(1, 10), corrupt_rate=0.5
    )
    pat = make_patterns(cfg)
    hits = 0
    corrupted, clean = [], []  # audio frame values inside / outside corrupted spans
    for i in range(cfg.clips):
        truth = draw_truth(cfg, i)
        for m in ("audio", "vision"):
            span = truth.corrupt[m]
            if span is None:
                continue
            hits += 1
            (a, b), (s, e) = span, truth.window[m]
            assert 0 <= a < b <= truth.lengths[m] and (b <= s or a >= e), (
                i,
                m,
                span,
                truth.window[m],
            )
            if m == "audio" and not truth.missing[0]:
                x = render_clip(cfg, truth, pat).audio
                corrupted.append(x[a:b].ravel())
                clean.append(np.delete(x, np.s_[a:b], axis=0).ravel())
    assert 150 < hits < 250  # about 0.5 * 2 * 200, minus clips too short to hold a span
    rms = [
        float(np.sqrt(np.mean(np.concatenate(v).astype(np.float64) ** 2)))
        for v in (corrupted, clean)
    ]
    assert rms[0] > 3.5 and rms[1] < 2.0, rms  # corruption std 4; background std 1 (+ evidence)


def test_mean_pooled_ridge_is_learnable_but_below_oracle(big) -> None:
    cfg, res = big
    store = FeatureStore(res.store)
    d_a, d_v, d_t = cfg.dims

    def features(ids: list[str]) -> np.ndarray:
        rows = []
        for clip_id in ids:
            c = store.get(clip_id)
            parts = [
                np.zeros(d_t) if c.text is None else np.asarray(c.text, np.float64),
                np.zeros(d_a) if c.audio is None else np.asarray(c.audio, np.float64).mean(0),
                np.zeros(d_v) if c.vision is None else np.asarray(c.vision, np.float64).mean(0),
                np.asarray(c.missing, np.float64),
                [1.0],
            ]
            rows.append(np.concatenate(parts))
        return np.asarray(rows)  # (N, D_t + D_a + D_v + 4)

    train, valid = read_labels(res.train_csv), read_labels(res.valid_csv)
    x_tr, x_va = features(train.ids), features(valid.ids)
    lam = 1.0
    w = np.linalg.solve(
        x_tr.T @ x_tr + lam * np.eye(x_tr.shape[1]), x_tr.T @ train.values
    )  # (F, E)
    score = compute_metrics(x_va @ w, valid.values, cfg.emotions).mean_pearson
    assert 0.2 < score < res.oracle["mean_pearson_observable"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clips": 1}, "clips"),
        ({"clips": 10, "valid_fraction": 0.0}, "valid_fraction"),
        ({"weights": (0.5, 0.5, 0.5)}, "weights"),
        ({"missing_rate": (0.1, 1.5, 0.0)}, "missing_rate"),
        ({"audio_len": (10, 5)}, "audio_len"),
        ({"dims": (0, 4, 4)}, "dims"),
        ({"evidence_fraction": (0.3, 0.9)}, "evidence_fraction"),
        ({"distractor": -1.0}, "distractor"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"SynthConfig.{field}"):
        SynthConfig(**kwargs)
