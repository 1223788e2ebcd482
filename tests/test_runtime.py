"""Runtime choices: precision auto-selection, compiled training."""

from __future__ import annotations

import pytest
import torch

from taemi import runtime
from taemi.train.trainer import train


def test_auto_precision_is_bf16_only_on_cpus_that_compute_it(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"  # an explicit choice is kept


def test_auto_precision_on_cuda_is_bf16_from_ampere_on_else_fp16(monkeypatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert runtime.resolve_precision("auto", cuda) == "bf16"  # H100/H200: no loss scaling
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert runtime.resolve_precision("auto", cuda) == "fp16"  # T4: fp16 + GradScaler
    assert runtime.resolve_precision("fp16", cuda) == "fp16"


def test_attention_backends_leave_out_cudnn_on_cuda_only() -> None:
    from torch.nn.attention import SDPBackend

    before = torch.backends.cuda.cudnn_sdp_enabled()
    assert before  # torch's default, which issue 14 measured re-planning per shape
    with runtime.attention_backends(torch.device("cpu")):  # a no-op on the CPU
        assert torch.backends.cuda.cudnn_sdp_enabled()
    with runtime.attention_backends(torch.device("cuda")):  # flags only: needs no GPU
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert SDPBackend.EFFICIENT_ATTENTION  # the kernel that takes any shape and the mask
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, store, labels, tiny_config) -> None:
    sets = (
        "model.modality_dropout=0",
        "model.attn_dropout=0",
        "model.sa_dropout=0",
        "model.head_dropout=0",
        "train.max_epochs=1",
        "train.patience=0",
    )
    eager = train(tiny_config(*sets), store, *labels, tmp_path / "eager", progress=False)
    compiled = train(
        tiny_config(*sets, "train.compile=true"),
        store,
        *labels,
        tmp_path / "compiled",
        progress=False,
    )
    assert compiled.history[0]["train_loss"] == pytest.approx(
        eager.history[0]["train_loss"], rel=1e-3
    )
    assert compiled.history[0]["valid_mean_pearson"] == pytest.approx(
        eager.history[0]["valid_mean_pearson"], abs=1e-3
    )


def test_configure_threads_uses_the_cores_this_process_may_run_on(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "available_cores", lambda: 3)
        assert runtime.configure_threads() == 3 and torch.get_num_threads() == 3
        assert runtime.configure_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            runtime.configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_offline_profile_passes_omp_threads_to_onnxruntime(monkeypatch) -> None:
    from taemi.backbones import profiles

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert profiles._env_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert profiles._env_threads() == 0  # not a count: onnxruntime chooses
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert profiles._env_threads() == 0
