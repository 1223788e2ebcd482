"""Runtime choices: precision auto-selection, compiled training."""

from __future__ import annotations

import pytest
import torch

from taemi.train import runtime
from taemi.train.trainer import train


def test_auto_precision_is_bf16_only_on_cpus_that_compute_it(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("auto", cuda) == "fp16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"  # an explicit choice is kept


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, store, labels, tiny_config) -> None:
    sets = ("model.modality_dropout=0", "model.attn_dropout=0", "model.sa_dropout=0", "model.head_dropout=0",
            "train.max_epochs=1", "train.patience=0")  # fmt: skip
    eager = train(tiny_config(*sets), store, *labels, tmp_path / "eager", progress=False)
    compiled = train(tiny_config(*sets, "train.compile=true"), store, *labels, tmp_path / "compiled", progress=False)
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-3)
    assert compiled.history[0]["valid_mean_pearson"] == pytest.approx(eager.history[0]["valid_mean_pearson"], abs=1e-3)
