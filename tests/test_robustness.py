"""Test-time degradations (docs/method.md section 5): each transform does exactly what it says, is
deterministic under a seed, and the suite + CLI write CSV and plots end to end."""

from __future__ import annotations

import argparse
import csv
import math

import numpy as np
import pytest
import torch
from conftest import is_png

from taemi.cli import robustness_cmd
from taemi.data.batch import Batch
from taemi.data.labels import read_labels
from taemi.eval.predict import predict_dataset
from taemi.experiments.robustness import (
    COMBINATIONS,
    add_noise,
    drop_combination,
    drop_frames,
    drop_modality,
    empty_transcripts,
    evaluate_degraded,
    predict_degraded,
    robustness_suite,
)
from taemi.inference import load_run
from taemi.store import FeatureStore
from taemi.synth.features import SynthConfig, make_synth
from taemi.train.modes import make_dataset
from taemi.train.trainer import train


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(
    B: int = 16,
    T_a: int = 30,
    T_v: int = 20,
    D: tuple[int, int, int] = (12, 10, 8),
    seed: int = 0,
    tokens: bool = False,
) -> Batch:
    """A random padded batch, nothing missing; clip b has lengths in [1, T]."""
    g = gen(seed)
    len_a = torch.randint(1, T_a + 1, (B,), generator=g)
    len_v = torch.randint(1, T_v + 1, (B,), generator=g)
    len_a[0], len_v[0] = T_a, T_v
    return Batch(
        audio=torch.randn(B, T_a, D[0], generator=g) * 3.0,
        audio_mask=torch.arange(T_a) < len_a.unsqueeze(1),
        vision=torch.randn(B, T_v, D[1], generator=g) + 1.0,
        vision_mask=torch.arange(T_v) < len_v.unsqueeze(1),
        text=torch.randn(B, D[2], generator=g),
        missing=torch.zeros(B, 3, dtype=torch.bool),
        text_tokens=torch.randn(B, 5, D[2], generator=g) if tokens else None,
        text_tokens_mask=torch.ones(B, 5, dtype=torch.bool) if tokens else None,
    )


def assert_batches_equal(a: Batch, b: Batch) -> None:
    for f in (
        "audio",
        "audio_mask",
        "vision",
        "vision_mask",
        "text",
        "missing",
        "text_tokens",
        "text_tokens_mask",
    ):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert torch.equal(x, y), f


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("modality", ["audio", "vision", "text"])
def test_drop_modality_marks_exactly_round_pB(modality) -> None:
    b = make_batch(B=16)
    out = drop_modality(b, modality, 0.5, gen())
    j = ("audio", "vision", "text").index(modality)
    assert int(out.missing[:, j].sum()) == 8
    others = [k for k in range(3) if k != j]
    assert torch.equal(out.missing[:, others], b.missing[:, others])
    assert not b.missing.any()  # the input is not modified
    assert_batches_equal(drop_modality(b, modality, 0.0, gen()), b)
    assert (
        out.missing[:, j].sum() == 8 and drop_modality(b, modality, 1.0, gen()).missing[:, j].all()
    )
    assert (
        int(drop_modality(make_batch(B=10), modality, 0.25, gen()).missing[:, j].sum()) == 3
    )  # 2.5 -> 3


def test_drop_modality_keeps_existing_missing_and_checks_args() -> None:
    b = make_batch(B=8)
    b.missing[0, 0] = True
    out = drop_modality(b, "audio", 0.0, gen())
    assert out.missing[0, 0]
    with pytest.raises(ValueError, match="speech"):
        drop_modality(b, "speech", 0.5, gen())
    with pytest.raises(ValueError, match="1.5"):
        drop_modality(b, "audio", 1.5, gen())


@pytest.mark.parametrize("combo", COMBINATIONS)
def test_drop_combination_sets_exactly_those_flags(combo) -> None:
    b = make_batch(B=6)
    out = drop_combination(b, combo)
    assert torch.equal(out.missing, torch.tensor(combo).expand(6, 3))
    assert torch.equal(out.audio_mask, b.audio_mask) and torch.equal(out.audio, b.audio)


def test_empty_transcripts_sets_text_missing() -> None:
    b = make_batch(B=12)
    out = empty_transcripts(b, 0.5, gen())
    assert int(out.missing[:, 2].sum()) == 6 and not out.missing[:, :2].any()
    assert empty_transcripts(b, 1.0, gen()).missing[:, 2].all()


def measured_snr(clean: torch.Tensor, noisy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-clip SNR (dB) over valid steps: (B, T, D), (B, T) -> (B,)."""
    w = mask.double().unsqueeze(-1)
    sig = (clean.double().square() * w).sum((1, 2))
    noise = ((noisy - clean).double().square() * w).sum((1, 2))
    return 10 * torch.log10(sig / noise)


@pytest.mark.parametrize("snr", [30.0, 10.0, 0.0, -5.0])
def test_add_noise_hits_the_requested_snr_on_valid_steps(snr) -> None:
    b = make_batch(B=4, T_a=400, T_v=300, D=(64, 48, 2048), tokens=True)
    b.audio_mask[1, 200:] = False  # some padding
    b.missing[3, 1] = True  # vision missing for clip 3: untouched
    out = add_noise(b, snr, gen())
    for m in ("audio", "vision"):
        x, y, mask = getattr(b, m), getattr(out, m), getattr(b, f"{m}_mask")
        assert torch.equal(x[~mask], y[~mask])  # padded steps untouched
        present = ~b.missing[:, ("audio", "vision").index(m)]
        got = measured_snr(x, y, mask)[present]
        assert torch.allclose(got, torch.full_like(got, snr, dtype=got.dtype), atol=0.5), (m, got)
    assert torch.equal(out.vision[3], b.vision[3])
    got = measured_snr(
        b.text.unsqueeze(1), out.text.unsqueeze(1), torch.ones(4, 1, dtype=torch.bool)
    )
    assert torch.allclose(got, torch.full_like(got, snr), atol=0.5)
    assert not torch.equal(out.text_tokens, b.text_tokens)


def test_add_noise_no_op_modalities_and_determinism() -> None:
    b = make_batch()
    assert_batches_equal(add_noise(b, None, gen()), b)
    assert_batches_equal(add_noise(b, math.inf, gen()), b)
    only_audio = add_noise(b, 10.0, gen(), modalities=("audio",))
    assert not torch.equal(only_audio.audio, b.audio)
    assert torch.equal(only_audio.vision, b.vision) and torch.equal(only_audio.text, b.text)
    assert_batches_equal(add_noise(b, 5.0, gen(3)), add_noise(b, 5.0, gen(3)))
    assert not torch.equal(add_noise(b, 5.0, gen(3)).audio, add_noise(b, 5.0, gen(4)).audio)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_drop_frames(p) -> None:
    b = make_batch(B=32, T_a=40, T_v=25)
    out = drop_frames(b, p, gen())
    for m in ("audio", "vision"):
        before, after = getattr(b, f"{m}_mask"), getattr(out, f"{m}_mask")
        assert not (after & ~before).any()  # padding never becomes valid
        n, k = before.sum(1), after.sum(1)
        assert (k >= 1).all()
        want_removed = torch.minimum(torch.floor(p * n + 0.5).long(), n - 1)
        assert torch.equal(n - k, want_removed)
        assert torch.equal(getattr(out, m), getattr(b, m))  # features untouched
    assert torch.equal(out.missing, b.missing) and torch.equal(out.text, b.text)
    assert_batches_equal(drop_frames(b, p, gen(7)), drop_frames(b, p, gen(7)))


def test_drop_frames_removes_random_steps_not_the_tail() -> None:
    b = make_batch(B=64, T_a=40, T_v=25)
    out = drop_frames(b, 0.5, gen())
    kept_last = (
        out.audio_mask & (b.audio_mask.cumsum(1) == b.audio_mask.sum(1, keepdim=True))
    ).any(1)
    assert 0 < int(kept_last.sum()) < 64


def test_transforms_are_deterministic_under_a_seed() -> None:
    b = make_batch(B=20)
    assert_batches_equal(
        drop_modality(b, "vision", 0.5, gen(1)), drop_modality(b, "vision", 0.5, gen(1))
    )
    assert not torch.equal(
        drop_modality(b, "vision", 0.5, gen(1)).missing,
        drop_modality(b, "vision", 0.5, gen(2)).missing,
    )


# --------------------------------------------------------------------------- suite and CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_config):
    """A 40-clip store and two 1-epoch runs (different seeds)."""
    root = tmp_path_factory.mktemp("robust")
    synth = make_synth(
        root / "synth",
        SynthConfig(clips=40, dims=(12, 10, 8), audio_len=(5, 15), vision_len=(4, 10), seed=0),
        progress=False,
    )
    store = FeatureStore(synth.store)
    train_l, valid_l = read_labels(synth.train_csv), read_labels(synth.valid_csv)
    runs = []
    for seed in (0, 1):
        cfg = tiny_config("train.max_epochs=1", "train.batch_size=8", f"train.seed={seed}")
        runs.append(
            train(cfg, store, train_l, valid_l, root / f"run{seed}", progress=False).run_dir
        )
    return synth, store, valid_l, runs


def test_p0_equals_clean_and_p1_audio_changes_predictions(tiny) -> None:
    _synth, store, valid_l, runs = tiny
    model, cfg = load_run(runs[0])
    ds = make_dataset(cfg, store, valid_l)
    clean, _ = predict_dataset(model, ds, batch_size=4)
    p0 = predict_degraded(
        model, ds, lambda b, g: drop_modality(b, "audio", 0.0, g), batch_size=4, seed=0
    )
    assert np.array_equal(p0, clean)
    p1 = predict_degraded(
        model, ds, lambda b, g: drop_modality(b, "audio", 1.0, g), batch_size=4, seed=0
    )
    assert not np.allclose(p1, clean)
    m = evaluate_degraded(model, ds, None, emotions=cfg.data.emotions, batch_size=4)
    assert m.n == len(valid_l.ids)
    noisy = [
        predict_degraded(model, ds, lambda b, g: add_noise(b, 0.0, g), batch_size=4, seed=5)
        for _ in range(2)
    ]
    assert np.array_equal(*noisy)


def test_suite_rows(tiny) -> None:
    _synth, store, valid_l, runs = tiny
    rows = robustness_suite(runs[0], store, valid_l, ps=(0.0, 1.0), snrs=(10,), seed=0)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("clean") == 1 and kinds.count("drop_modality") == 6
    assert (
        kinds.count("combination") == 8
        and kinds.count("noise") == 1
        and kinds.count("frame_drop") == 2
    )
    by = {(r["kind"], r["condition"], r["level"]): r for r in rows}
    clean = by[("clean", "none", "")]["mean_pearson"]
    assert by[("drop_modality", "audio", 0.0)]["mean_pearson"] == clean
    assert by[("combination", "none", "")]["mean_pearson"] == clean
    assert by[("frame_drop", "audio+vision", 0.0)]["mean_pearson"] == clean
    assert all(f"pearson_{e}" in rows[0] for e in valid_l.emotions)


def test_cli_end_to_end_with_compare(tiny, tmp_path, capsys) -> None:
    synth, _store, _valid_l, runs = tiny
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    robustness_cmd.register(sub, lambda sp: sp.add_argument("--no-progress", action="store_true"))
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "robustness",
            "--run",
            str(runs[0]),
            "--store",
            str(synth.store),
            "--labels",
            str(synth.valid_csv),
            "--out",
            str(out),
            "--compare",
            str(runs[1]),
            "--seed",
            "3",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    with (out / "robustness.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    per_run = 1 + 3 * 5 + 8 + 5 + 5
    assert len(rows) == 2 * per_run
    assert {r["run"] for r in rows} == {str(runs[0]), str(runs[1])}
    for name in ("modality_drop", "noise", "frame_drop", "combinations"):
        assert is_png(out / f"{name}.png"), name
    assert "mean r" in capsys.readouterr().out
