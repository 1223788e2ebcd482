"""Device, precision and determinism settings shared by training and inference."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from taemi.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bfloat16 natively: compute capability 8.0 (Ampere) or later.

    Not ``torch.cuda.is_bf16_supported()``, which by default also says yes where bf16 is
    only emulated (and slower than fp32)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> on CUDA bf16 autocast where the GPU has bf16 (:func:`cuda_has_bf16`: no
    loss scaling, and bf16's range needs none), else fp16 with grad scaling (on the device
    with fused AdamW, so captured steps take it too);
    on CPU bf16 autocast where the CPU computes bf16 natively (:func:`preferred_cpu_precision`:
    the recipe's "bf16 on CPU where it helps"), else fp32. fp16 on CPU is refused."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_bf16(device) else "fp16"
        return preferred_cpu_precision()
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
    return name


def autocast(
    device: torch.device, precision: str, *, cache: bool = True
) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass (a no-op for fp32). ``cache=False`` for a pass
    captured in a CUDA graph (the weight-cast cache must not outlive the capture)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(
        device_type=device.type, dtype=autocast_dtype(precision), cache_enabled=cache
    )


def autocast_dtype(precision: str) -> torch.dtype:
    """The low-precision dtype of ``precision`` (bf16 or fp16)."""
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision {precision!r} has no autocast dtype (bf16 or fp16)")
    return torch.float16 if precision == "fp16" else torch.bfloat16


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, scaled-dot-product attention restricted to the flash, memory-efficient and
    math kernels; elsewhere a no-op.

    Under autocast, torch prefers cuDNN attention, which builds a new execution plan for
    every (batch, length) shape it meets: with the corpus's varying lengths that took 0.2-0.3 s
    per training step on an H200, 25x slower than fp32 (issue 14). The memory-efficient
    kernel takes any shape and the boolean padding mask without re-planning. Used around every
    forward pass of training, validation and prediction (the model's own attention and the
    fine-tuned backbones')."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 on x86, or
    what oneDNN reports elsewhere): where bf16 autocast makes a CPU step faster.

    On CPUs without it, bf16 matmuls are emulated by conversion and are no faster than
    fp32 (often slower); ``benchmarks/train_throughput.py`` measures both.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    try:  # not Linux: ask oneDNN (private API, best effort)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def preferred_cpu_precision() -> str:
    """``bf16`` where the CPU computes it natively (:func:`cpu_has_bf16`), else ``fp32``.

    The recipe (docs/method.md section 6) asks for bf16 autocast on CPU "where it helps"; on an
    AVX512-BF16 CPU a paper-preset training step reached 1.2-1.4x the useful FLOP/s of
    fp32 (``benchmarks/README.md``). Outputs agree with fp32 to ~1e-2 (bf16 has an 8-bit
    mantissa); the loss and Pearson are still computed in float32/float64.
    """
    return "bf16" if cpu_has_bf16() else "fp32"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, or one per available core; returns it.

    One thread per core is what the matmul kernels want; more threads than cores (e.g.
    torch's default on a machine whose container limits it to fewer cores than it has)
    oversubscribe and slow every kernel down. DataLoader workers take cores too: with
    ``num_workers > 0`` on a small machine, leave them a core or use 0 workers (see
    ``benchmarks/README.md``, loader_wait).
    """
    n = available_cores() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    torch.set_num_threads(n)
    return n
