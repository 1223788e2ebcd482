"""Learning-rate schedule: per-step linear warm-up, then cosine decay to 0 (docs/method.md section 6)."""

from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch

from taemi.train.schedule import make_scheduler, warmup_cosine
from taemi.train.trainer import train


def formula(step: int, warmup: int, total: int) -> float:
    """The schedule written out independently: (s+1)/W during warm-up, then
    0.5 (1 + cos(pi * (s - W) / (T - W)))."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


@pytest.mark.parametrize("warmup", [1, 4, 10])
def test_warmup_values(warmup: int) -> None:
    total = 50
    assert warmup_cosine(0, warmup, total) == pytest.approx(1 / warmup)
    # linear: equal increments up to exactly 1 at the last warm-up step
    for s in range(warmup):
        assert warmup_cosine(s, warmup, total) == pytest.approx((s + 1) / warmup)
    assert warmup_cosine(warmup - 1, warmup, total) == 1.0
    assert warmup_cosine(warmup, warmup, total) == 1.0  # the cosine part starts at its top


def test_cosine_values() -> None:
    warmup, total = 4, 24  # cosine part: 20 steps
    assert warmup_cosine(warmup + 10, warmup, total) == pytest.approx(0.5)  # halfway
    assert warmup_cosine(warmup + 5, warmup, total) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4))
    )
    assert warmup_cosine(total, warmup, total) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine(total + 7, warmup, total) == pytest.approx(0.0, abs=1e-15)  # stays at 0
    values = [warmup_cosine(s, warmup, total) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in itertools.pairwise(values))  # strictly decreasing
    assert all(0.0 <= v <= 1.0 for v in values)


def test_no_warmup_starts_at_full_lr() -> None:
    assert warmup_cosine(0, 0, 10) == 1.0
    assert warmup_cosine(5, 0, 10) == pytest.approx(0.5)
    assert warmup_cosine(10, 0, 10) == pytest.approx(0.0, abs=1e-15)


def test_lambdalr_over_adamw_gives_the_lr_sequence() -> None:
    """One 'epoch' = 4 steps of warm-up, 3 epochs in all: lr after k optimiser steps."""
    lr, warmup, total = 1e-3, 4, 12
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.01)
    sched = make_scheduler(opt, warmup, total)
    seen = [opt.param_groups[0]["lr"]]  # the lr the first step will use
    for _ in range(total):
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr()[0] == seen[-1]
    expected = [
        lr * v
        for v in (0.25, 0.5, 0.75, 1.0, 1.0)  # warm-up, then the top of the cosine
    ] + [lr * formula(s, warmup, total) for s in range(5, total + 1)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert seen[warmup + 4] == pytest.approx(lr * 0.5)  # halfway through the 8 cosine steps
    assert seen[-1] == pytest.approx(0.0, abs=1e-18)


def test_trainer_lr_in_history_follows_the_formula(
    tmp_path, synth, store, labels, tiny_config
) -> None:
    """72 train clips / batch 16 -> 5 steps per epoch; warm-up 1 epoch = 5 steps; 3 epochs.

    The lr logged at the end of epoch e is the one after e * 5 steps: 1.0, 0.5, 0.0 x lr.
    """
    cfg = tiny_config("train.max_epochs=3", "train.lr=2e-3", "train.patience=0")
    res = train(cfg, store, *labels, tmp_path / "run", progress=False)
    steps = math.ceil(len(labels[0]) / cfg.train.batch_size)
    assert steps == 5
    with open(tmp_path / "run" / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    logged = [float(r["lr"]) for r in rows]
    expected = [2e-3 * formula(e * steps, steps, 3 * steps) for e in (1, 2, 3)]
    assert logged == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert logged[:2] == pytest.approx([2e-3, 1e-3])
    assert logged[2] == pytest.approx(0.0, abs=1e-18)
    assert [r["lr"] for r in res.history] == logged  # CSV round-trips the floats
