"""Training throughput of the TAEMI presets at paper dimensions with the corpus's length mix,
against the machine's dense matmul rate and a plain padded implementation, in one run.

Batches: 32 clips with the corpus's length mix (``taemi.data.sampler.abaw_like_lengths``:
audio log-normal, mean 6.9 s, 95th percentile 11.5 s at 50 frames/s, capped at 599; face
frames 30 fps x U(0.6, 1.0) found, capped at 400; 1% audio and 3% vision missing), features
random at paper dimensions (1027 / 768 / 768). Every timed step is the trainer's step:
autocast forward, MSE in float32, ``zero_grad``, backward, ``clip_grad_value_(100)``,
AdamW, LR scheduler, ``loss.item()``.

Runners (``--runners``), all timed round-robin in the same process, one step each per
round, each step preceded by a 2048^3 fp32 matmul measurement (the box is shared and its
speed changes from second to second: every step is compared with the rate just before it):

- ``plain``: a plain padded implementation of the same model, written here (not in the
  package): ``nn.TransformerEncoderLayer`` self-attention, hand-written cross-attention,
  missing tokens substituted into the RAW inputs before the first projection (so backward
  computes the input gradient of the (B, T, 1027) audio), random batches (the trainer's
  ``RandomSampler``) padded to the batch maximum, fp32;
- ``before``: the project's model as it was before this issue: random batches, and the
  cross-attention K/V projections as two products;
- ``eager``: the model now, with length-bucketed batches (``LengthBucketBatchSampler``), fp32;
- ``bf16``: the same under bf16 autocast (each weight cast at each use);
- ``bf16_precast``, ``fp16_precast`` (CUDA): the same with the weights cast once per step
  (``taemi.train.precast``, what the trainer's eager step does in one process);
- ``compiled``, ``compiled_bf16``, ``compiled_fp16`` (``--compile``): ``torch.compile(model, dynamic=True)``;
- ``sdpa_ca``: bucketed, fp32, the cross-attention as the release writes it (K and V
  projected over the whole sequence, fused attention): the A/B of the model's pooled-value
  cross-attention (``taemi.model.taemi.CrossAttention``);
- ``fp16`` (CUDA): bucketed, fp16 autocast with the trainer's ``GradScaler``;
- ``bf16_cudnn`` (CUDA): bf16 autocast with torch's default attention choice, cuDNN
  attention included (the project before issue 14: a new cuDNN plan per batch shape); every
  other autocast runner restricts attention as the trainer does (``runtime.attention_backends``);
- ``graphed_bf16``, ``graphed_fp32`` (CUDA): the trainer's captured step
  (``taemi.train.step.GraphedStep``: forward with the weights cast once per step, backward
  writing over the gradients, clipping and capturable fused AdamW in one CUDA graph per batch
  shape), bucketed batches padded to a multiple of 32 steps (``data.length_quantum`` on
  CUDA); warm-up runs every timed batch twice (the eager first step, then the capture);
  ``graphed_bf16_each_use``: the same with autocast casting each weight at each use
  (``train.precast_weights=false``); ``graphed_bf16_compiled``: the same step with its
  forward and backward compiled first (``train.compile=true`` with captured steps; the
  compilation is part of the warm-up); ``graphed_fp16`` (CUDA): the captured step in fp16
  with the trainer's grad scaler, whose cycle is captured with it (cards without bf16);
- ``unfused_adamw``: bucketed, fp32, AdamW's per-parameter loop (the trainer's optimiser
  is ``AdamW(fused=True)``, as in every other package runner);
- ``threads1``: bucketed, fp32, ``torch.set_num_threads(1)``.

FLOPs count only useful work: per clip, its own lengths (a missing modality counts as one
step), matrix products only, training = 3 x forward minus the input gradient of the layers
fed by the frozen features (the first projections: backward never computes it). The
formula is checked against ``FlopCounterMode`` on one unpadded clip. Padded positions
cost time but add no FLOPs: padding lowers utilisation.

Two counts, both printed. "util" uses the issue's count: the FLOPs of the model as the
release writes it (K and V projected at every step). The package's cross-attention pools
the values with the attention weights before projecting them (the same function with
fewer FLOPs), so its steps EXECUTE fewer FLOPs than that count; "exec util" divides the
FLOPs the runner's step actually executes (``executed_train_flops``; for the other
runners the two counts are the same) by the matmul rate, i.e. how busy the step keeps the
matrix units.

Printed per runner: padding fraction of its timed batches, seconds per step, samples/s,
useful GFLOP/s, utilisation against the fp32 matmul rate measured just before each step
(median over steps: "util adj") and against the best rate of the run ("util best"), and
the projected time of an epoch of 8,072 clips: "epoch min" = the epoch's useful FLOPs / the
runner's useful FLOP rate over its timed steps (batches chosen at evenly spaced quantiles
of size), as measured on the box with its load; "at best" = the epoch's useful FLOPs /
(util adj x the best fp32 matmul rate of the run), i.e. the same utilisation on the box
when nothing else runs.

``--profile N``: after the timing, each runner's step runs N more times under
``torch.profiler`` (batches cycled, no wait between steps) and its most expensive
operations are printed: on CUDA the kernels by device time, with their share of it and
"device busy" = kernel time / wall time (well below 100%: the step waits on launches or
the host, not on the GPU); on the CPU the operators by self CPU time. This says where a
step's time goes, so that a session with a GPU can see what bounds it in one run.

Usage::

    python benchmarks/train_throughput.py                     # paper + official, ~10 min on 2 cores
    python benchmarks/train_throughput.py --presets official --runners sdpa_ca eager unfused_adamw threads1
    python benchmarks/train_throughput.py --device cuda --steps 30 --warmup 3 --runners plain before eager fp16 bf16
    python benchmarks/train_throughput.py --compile           # + torch.compile runners (~+6 min)
    python benchmarks/train_throughput.py --device cuda --presets paper --batch-size 256 --runners bf16 graphed_bf16 --profile 5
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taemi.config import ModelConfig, RunConfig, build_config
from taemi.data.batch import Batch, padded_length
from taemi.data.sampler import LengthBucketBatchSampler, abaw_like_lengths, padding_fraction
from taemi.model.taemi import CrossAttention, PaddedSequence
from taemi.runtime import attention_backends, autocast, cpu_has_bf16
from taemi.train.modes import build_model
from taemi.train.precast import PrecastWeights
from taemi.train.schedule import make_scheduler
from taemi.train.step import GraphedStep
from taemi.train.trainer import CUDA_LENGTH_QUANTUM, make_optimizer

EPOCH_CLIPS = 8072  # ABAW EMI training split (docs/method.md section 2)
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- FLOPs


def forward_flops(cfg: ModelConfig, t_a: int, t_v: int, num_outputs: int) -> dict[str, int]:
    """Forward FLOPs of ONE sample, by component; a multiply-add counts 2 FLOPs.

    Only matrix products are counted (LayerNorm, GELU, softmax, masking, dropout and the
    missing-token substitution are O(T*H) and left out). With D the raw feature size of a
    key/value modality m, T its length, H = hidden, F = sa_ffn, Dq = the query size
    (768 for the text anchor), Hh = head_hidden, E = outputs:

    - projection (when ``align`` or fusion != cross_attention):    2*T*D*H
    - self-attention layer (fusion cross_attention/self_attention):
        qkv 2*T*H*3H + QK^T 2*T*T*H + AV 2*T*T*H + out_proj 2*T*H*H + FFN 2*T*H*F*2
    - cross-attention (single query), K/V from size Dkv (H if projected, else D):
        q_proj 2*Dq*H + k_proj 2*T*Dkv*H + v_proj 2*T*Dkv*H + QK^T 2*T*H + AV 2*T*H
        + out_proj 2*H*H
    - head: 2*(Dq + n_kv*H)*Hh + 2*Hh*E
    """
    dims = {"audio": cfg.audio_dim, "vision": cfg.vision_dim, "text": cfg.text_dim}
    lengths = {
        "audio": max(t_a, 1),
        "vision": max(t_v, 1),
        "text": 1,
    }  # missing: the token, one step
    H, F_, Dq = cfg.hidden, cfg.sa_ffn, dims[cfg.anchor]
    encode = cfg.fusion != "cross_attention" or cfg.align
    with_sa = cfg.fusion in ("cross_attention", "self_attention")
    others = [m for m in ("audio", "vision", "text") if m != cfg.anchor]
    out: dict[str, int] = {}
    for m in others:
        D, T = dims[m], lengths[m]
        if encode:
            out[f"{m}.proj"] = 2 * T * D * H
            if with_sa:
                out[f"{m}.sa.qkv"] = 2 * T * H * 3 * H
                out[f"{m}.sa.qk_av"] = 2 * (2 * T * T * H)
                out[f"{m}.sa.out"] = 2 * T * H * H
                out[f"{m}.sa.ffn"] = 2 * (2 * T * H * F_)
        if cfg.fusion == "cross_attention":
            dkv = H if encode else D
            out[f"{m}.ca.q"] = 2 * Dq * H
            out[f"{m}.ca.kv"] = 2 * (2 * T * dkv * H)
            out[f"{m}.ca.qk_av"] = 2 * (2 * T * H)
            out[f"{m}.ca.out"] = 2 * H * H
    fused = Dq + len(others) * H
    out["head"] = 2 * fused * cfg.head_hidden + 2 * cfg.head_hidden * num_outputs
    return out


def frozen_input_terms(cfg: ModelConfig) -> tuple[str, ...]:
    """Suffixes of the forward terms whose input is a frozen feature (no input gradient)."""
    encode = cfg.fusion != "cross_attention" or cfg.align
    return (".proj",) if encode else (".ca.kv", ".ca.k", ".ca.pool")


def executed_forward_flops(
    cfg: ModelConfig, t_a: int, t_v: int, num_outputs: int
) -> dict[str, int]:
    """Forward FLOPs of ONE sample as the package's model computes them.

    As :func:`forward_flops`, except the cross-attention: its values are pooled with the
    attention weights before their projection (h = heads):
    q_proj 2*Dq*H + k_proj 2*T*Dkv*H + scores 2*T*H + pooling 2*T*h*Dkv
    + per-head value projection 2*Dkv*H + out_proj 2*H*H. (The scores are an elementwise
    product and sum, which ``FlopCounterMode`` does not count: 0.1% of the total.)
    """
    out = {k: v for k, v in forward_flops(cfg, t_a, t_v, num_outputs).items() if ".ca." not in k}
    if cfg.fusion != "cross_attention":
        return out
    dims = {"audio": cfg.audio_dim, "vision": cfg.vision_dim, "text": cfg.text_dim}
    lengths = {"audio": max(t_a, 1), "vision": max(t_v, 1), "text": 1}
    H, h, Dq = cfg.hidden, cfg.heads, dims[cfg.anchor]
    encode = cfg.align
    for m in [m for m in ("audio", "vision", "text") if m != cfg.anchor]:
        T, dkv = lengths[m], (H if encode else dims[m])
        out[f"{m}.ca.q"] = 2 * Dq * H
        out[f"{m}.ca.k"] = 2 * T * dkv * H
        out[f"{m}.ca.scores"] = 2 * T * H
        out[f"{m}.ca.pool"] = 2 * T * h * dkv
        out[f"{m}.ca.v"] = 2 * dkv * H
        out[f"{m}.ca.out"] = 2 * H * H
    return out


def train_flops(
    cfg: ModelConfig, t_a: int, t_v: int, num_outputs: int, *, executed: bool = False
) -> int:
    """Useful training FLOPs of one clip: 3 x forward, less the input gradients never computed.

    ``executed=False``: the issue's count (the model as released); ``True``: what the
    package's model executes (:func:`executed_forward_flops`).
    """
    fwd = (executed_forward_flops if executed else forward_flops)(cfg, t_a, t_v, num_outputs)
    frozen = sum(
        v
        for k, v in fwd.items()
        if k.endswith(frozen_input_terms(cfg)) and not k.startswith("text")
    )
    return 3 * sum(fwd.values()) - frozen


def counted_flops(model: nn.Module, batch: Batch) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of ``batch`` per FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch)
    fwd = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(batch).float(), batch.target).backward()
    model.zero_grad(set_to_none=True)
    return fwd, counter.get_total_flops()


# --------------------------------------------------------------------------- the plain padded reference


class PlainCrossAttention(nn.Module):
    """Single-query cross-attention written out by hand: softmax(q k^T / sqrt(hd)) v."""

    def __init__(self, query_dim: int, kv_dim: int, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.q_proj, self.k_proj = nn.Linear(query_dim, hidden), nn.Linear(kv_dim, hidden)
        self.v_proj, self.out_proj = nn.Linear(kv_dim, hidden), nn.Linear(hidden, hidden)
        self.ln_q, self.ln_kv = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, t: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        """t (B, Dq), x (B, T, D), mask (B, T) True = valid -> (B, H)."""
        B, T, _ = x.shape
        h, hd = self.heads, self.hidden // self.heads
        q = self.ln_q(self.q_proj(t)).view(B, h, 1, hd)
        k = self.ln_kv(self.k_proj(x)).view(B, T, h, hd).transpose(1, 2)  # (B, h, T, hd)
        v = self.v_proj(x).view(B, T, h, hd).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, h, 1, T)
        scores = scores.masked_fill(~mask.view(B, 1, 1, T), float("-inf"))
        attn = self.drop(scores.softmax(dim=-1))
        return self.out_proj((attn @ v).reshape(B, self.hidden))


class PlainTAEMI(nn.Module):
    """The paper / release model as a straightforward implementation would write it: tokens
    substituted into the raw features first, ``nn.TransformerEncoderLayer`` (post-norm,
    GELU) as the self-attention layer, padded batches. Text anchor only."""

    def __init__(self, cfg: ModelConfig, num_outputs: int):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.tok_a = nn.Parameter(torch.randn(cfg.audio_dim) * 0.02)
        self.tok_v = nn.Parameter(torch.randn(cfg.vision_dim) * 0.02)
        self.tok_t = nn.Parameter(torch.randn(cfg.text_dim) * 0.02)
        kv = {"audio": cfg.audio_dim, "vision": cfg.vision_dim}
        if cfg.align:
            for m in kv:
                self.add_module(f"proj_{m}", nn.Linear(kv[m], H))
                self.add_module(
                    f"sa_{m}",
                    nn.TransformerEncoderLayer(
                        H,
                        cfg.heads,
                        cfg.sa_ffn,
                        cfg.sa_dropout,
                        activation="gelu",
                        batch_first=True,
                    ),
                )
            kv = {m: H for m in kv}
        self.ca_audio = PlainCrossAttention(
            cfg.text_dim, kv["audio"], H, cfg.heads, cfg.attn_dropout
        )
        self.ca_vision = PlainCrossAttention(
            cfg.text_dim, kv["vision"], H, cfg.heads, cfg.attn_dropout
        )
        self.head = nn.Sequential(
            nn.Linear(cfg.text_dim + 2 * H, cfg.head_hidden),
            nn.GELU(),
            nn.Dropout(cfg.head_dropout),
            nn.Linear(cfg.head_hidden, num_outputs),
        )

    def forward(self, b: Batch) -> Tensor:
        missing = b.missing
        if self.training:
            missing = missing | (
                torch.rand(missing.shape, device=missing.device) < self.cfg.modality_dropout
            )
        a = torch.where(
            missing[:, 0, None, None], self.tok_a, b.audio
        )  # (B, T_a, 1027), needs grad
        v = torch.where(missing[:, 1, None, None], self.tok_v, b.vision)
        t = torch.where(missing[:, 2, None], self.tok_t, b.text)
        ma, mv = b.audio_mask | missing[:, :1], b.vision_mask | missing[:, 1:2]
        if self.cfg.align:
            a = self.sa_audio(self.proj_audio(a), src_key_padding_mask=~ma)
            v = self.sa_vision(self.proj_vision(v), src_key_padding_mask=~mv)
        f = torch.cat([t, self.ca_audio(t, a, ma), self.ca_vision(t, v, mv)], dim=-1)  # (B, 1792)
        return self.head(f)


class ReleaseCrossAttention(CrossAttention):
    """The cross-attention as the release writes it (and this project before issue 7): K and V
    projected over the whole sequence (the missing token substituted into both), SDPA."""

    def forward(self, query: Tensor, kv: PaddedSequence) -> Tensor:
        B, T, _ = kv.x.shape
        h = self.heads
        q = self.ln_q(self.q_proj(query)).view(B, h, 1, -1)
        k = self.ln_kv(kv.project(self.k_proj)).view(B, T, h, -1).transpose(1, 2)
        v = kv.project(self.v_proj).view(B, T, h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=kv.mask.view(B, 1, 1, T),
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.out_proj(out.reshape(B, -1))


def release_cross_attention(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if type(mod) is CrossAttention:
            mod.__class__ = ReleaseCrossAttention
    return model


# --------------------------------------------------------------------------- machine


class MatmulProbe:
    """FLOP/s of an (n x n) @ (n x n) product in ``dtype`` on ``device``; the operands are made once."""

    def __init__(self, dtype: torch.dtype, n: int = 2048, device: torch.device = CPU):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(device, dtype)
        self.b = torch.randn(n, n, generator=g).to(device, dtype)
        self.n, self.device = n, device

    def __call__(self, repeats: int = 3, warmup: int = 1) -> float:
        for _ in range(warmup):
            torch.matmul(self.a, self.b)
        best = float("inf")
        for _ in range(repeats):
            sync(self.device)
            t0 = time.perf_counter()
            torch.matmul(self.a, self.b)
            sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return 2 * self.n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sdpa_backends(cfg: ModelConfig, batch: int, t: int, device: torch.device = CPU) -> str:
    """The fused-attention choice for the self-attention shapes (private torch API: best effort)."""
    try:
        from torch.nn.attention import SDPBackend

        q = torch.zeros(batch, cfg.heads, t, cfg.hidden // cfg.heads, device=device)
        mask = torch.ones(batch, 1, 1, t, dtype=torch.bool, device=device)
        names = []
        for label, p in (("train", cfg.attn_dropout), ("eval", 0.0)):
            names.append(
                f"{label} (dropout {p}): {SDPBackend(torch._fused_sdp_choice(q, q, q, mask, p, False)).name}"
            )
        return "; ".join(names)
    except (ImportError, AttributeError, RuntimeError, TypeError, ValueError) as exc:  # private API
        return f"unknown ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------- batches


def make_batch(
    lengths: np.ndarray, cfg: RunConfig, seed: int, device: torch.device = CPU, quantum: int = 1
) -> Batch:
    """Random paper-dimension features for clips of ``lengths`` (B, 2), padded to the batch max
    (rounded up to a multiple of ``quantum``), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    la, lv = torch.from_numpy(lengths[:, 0]), torch.from_numpy(lengths[:, 1])
    B = len(lengths)
    Ta, Tv = padded_length(int(la.max()), quantum), padded_length(int(lv.max()), quantum)
    return Batch(
        audio=torch.randn(B, Ta, m.audio_dim, generator=g),  # (B, T_a, 1027)
        audio_mask=torch.arange(Ta) < la[:, None],
        vision=torch.randn(B, Tv, m.vision_dim, generator=g),  # (B, T_v, 768)
        vision_mask=torch.arange(Tv) < lv[:, None],
        text=torch.randn(B, m.text_dim, generator=g),
        missing=torch.stack([la == 0, lv == 0, torch.zeros(B, dtype=torch.bool)], dim=1),
        target=torch.rand(B, len(cfg.data.emotions), generator=g),
    ).to(device)


def quantile_pick(
    batches: list[np.ndarray], key: Callable[[np.ndarray], float], k: int
) -> list[np.ndarray]:
    """``k`` batches at evenly spaced quantiles of ``key`` (a representative sample)."""
    order = sorted(range(len(batches)), key=lambda i: key(batches[i]))
    return [batches[order[int((j + 0.5) * len(order) / k)]] for j in range(k)]


# --------------------------------------------------------------------------- runners


@dataclass
class Runner:
    name: str
    what: str
    step: Callable[[Batch], None]
    batches: list[Batch]
    flops: list[int]  # useful training FLOPs of each batch (the count)
    padding: float  # padding fraction of the timed batches
    exec_flops: list[int] | None = None  # FLOPs the step executes, when fewer (pooled values)
    warmup_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    done_flops: list[int] = field(default_factory=list)
    done_exec: list[int] = field(default_factory=list)
    matmul: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Useful FLOP/s over all timed steps."""
        return sum(self.done_flops) / sum(self.step_s)

    @property
    def util_adjacent(self) -> float:
        return statistics.median(
            f / s / r for f, s, r in zip(self.done_flops, self.step_s, self.matmul)
        )

    @property
    def exec_util_adjacent(self) -> float:
        return statistics.median(
            f / s / r for f, s, r in zip(self.done_exec, self.step_s, self.matmul)
        )

    @property
    def samples_s(self) -> float:
        return sum(self.samples) / sum(self.step_s)


def make_step(
    model: nn.Module,
    fwd: Callable[[Batch], Tensor],
    cfg: RunConfig,
    precision: str,
    *,
    fused_adamw: bool = False,
    threads: int | None = None,
    device: torch.device = CPU,
    cudnn_attention: bool = False,
    precast: bool = False,
) -> Callable[[Batch], None]:
    """The trainer's eager step; fp16 (CUDA) with its ``GradScaler``, as the trainer does;
    attention restricted as the trainer does unless ``cudnn_attention``; ``precast``: the
    weights cast once per step (``taemi.train.precast``) instead of by autocast at each use."""
    tc = cfg.train
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        betas=tc.betas,
        fused=True if fused_adamw else None,
    )
    scheduler = make_scheduler(optimizer, 10, 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    weights: list[PrecastWeights] = []  # made on the first batch

    def step(batch: Batch, wait: bool = True) -> None:
        if precast and not weights:
            weights.append(PrecastWeights.for_model(model, batch, device, precision))
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with (
                contextlib.nullcontext() if cudnn_attention else attention_backends(device),
                autocast(device, precision),
            ):
                pred = weights[0].forward(batch) if precast else fwd(batch)  # (B, E)
            loss = F.mse_loss(pred.float(), batch.target)
            if precast:
                weights[0].backward(scaler.scale(loss))  # writes over the gradients
            else:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_value_(model.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if wait:
                loss.item()  # waits for the device
        finally:
            torch.set_num_threads(before)

    return step


def graphed_step(
    model: nn.Module,
    cfg: RunConfig,
    precision: str,
    device: torch.device,
    batch_size: int,
    precast: bool = True,
    compile: bool = False,
) -> Callable[[Batch], None]:
    """The trainer's captured step (:class:`taemi.train.step.GraphedStep`); off CUDA its
    eager stand-in. The schedule is stepped after each step, as the trainer does."""
    model.to(device)
    cfg = replace(
        cfg,
        data=replace(cfg.data, length_quantum=CUDA_LENGTH_QUANTUM),
        # batch_size sizes the static buffers
        train=replace(cfg.train, batch_size=batch_size, precast_weights=precast),
    )
    optimizer = make_optimizer(cfg, model, capturable=True)
    scheduler = make_scheduler(optimizer, 10, 1000)
    dims = {
        "audio": cfg.model.audio_dim,
        "vision": cfg.model.vision_dim,
        "text": cfg.model.text_dim,
    }
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    engine = GraphedStep.build(
        model,
        optimizer,
        cfg,
        device,
        precision,
        dims,
        max_shapes=256,
        compile=compile,
        scaler=scaler,
    )

    def step(batch: Batch, wait: bool = True) -> None:
        loss = engine.compute([batch], len(batch))
        scheduler.step()
        if wait:
            loss.item()  # waits for the device

    step.engine = engine  # type: ignore[attr-defined]
    return step


RELEASE_FORM_RUNNERS = ("plain", "before", "sdpa_ca")  # execute the count (plain: more)
RUNNERS = (
    "plain",
    "before",
    "eager",
    "bf16",
    "bf16_precast",
    "fp16",
    "fp16_precast",
    "bf16_cudnn",
    "graphed_bf16",
    "graphed_bf16_each_use",
    "graphed_bf16_compiled",
    "graphed_fp16",
    "graphed_fp32",
    "compiled",
    "compiled_bf16",
    "compiled_fp16",
    "sdpa_ca",
    "unfused_adamw",
    "threads1",
)


def build_runner(
    name: str,
    cfg: RunConfig,
    sets: dict[str, tuple[list[Batch], list[int], float]],
    device: torch.device = CPU,
) -> Runner:
    """One runner. The package's runners step as the trainer does (fused AdamW); ``plain``
    and ``before`` as the code before issue 7 did (AdamW's per-parameter loop)."""
    torch.manual_seed(0)
    E = len(cfg.data.emotions)
    random_set, bucket_set = sets["random"], sets["bucketed"]

    def step(
        model: nn.Module,
        precision: str = "fp32",
        fwd: Callable[[Batch], Tensor] | None = None,
        **kw,
    ) -> Callable[[Batch], None]:
        kw.setdefault("fused_adamw", True)
        return make_step(
            model, fwd if fwd is not None else model, cfg, precision, device=device, **kw
        )

    if name == "plain":
        model = PlainTAEMI(cfg.model, E).train()
        return Runner(
            name,
            "plain padded reference, random batches, fp32",
            step(model, fused_adamw=False),
            *random_set,
        )
    model = build_model(cfg).train()
    if name == "before":
        release_cross_attention(model)
        return Runner(
            name,
            "project before this issue: random batches, release-form cross-attention, fp32",
            step(model, fused_adamw=False),
            *random_set,
        )
    if name == "sdpa_ca":
        release_cross_attention(model)
        return Runner(
            name,
            "bucketed, fp32, release-form cross-attention (K, V over the sequence, SDPA)",
            step(model),
            *bucket_set,
        )
    if name.startswith("compiled"):
        prec = name.split("_")[1] if "_" in name else "fp32"
        fwd = torch.compile(model.to(device), dynamic=True)
        return Runner(
            name,
            f"bucketed, torch.compile(dynamic=True), {prec}",
            step(model, prec, fwd),
            *bucket_set,
        )
    if name in ("bf16", "fp16"):
        what = "bf16 autocast" if name == "bf16" else "fp16 autocast + GradScaler"
        return Runner(name, f"bucketed, {what}", step(model, name), *bucket_set)
    if name in ("bf16_precast", "fp16_precast"):
        prec = name.split("_")[0]
        return Runner(
            name,
            f"bucketed, {prec} autocast, weights cast once per step (the trainer's eager step)",
            step(model, prec, precast=True),
            *bucket_set,
        )
    if name == "bf16_cudnn":
        return Runner(
            name,
            "bucketed, bf16 autocast, torch's attention choice (cuDNN included)",
            step(model, "bf16", cudnn_attention=True),
            *bucket_set,
        )
    if name.startswith("graphed"):
        prec = name.split("_")[1]
        each_use, compiled = name.endswith("_each_use"), name.endswith("_compiled")
        return Runner(
            name,
            f"bucketed, lengths padded to a multiple of {CUDA_LENGTH_QUANTUM}, {prec}, "
            "whole step captured per shape (GraphedStep), "
            + ("autocast casting at each use" if each_use else "weights cast once per step")
            + (", forward and backward compiled (dynamic shapes)" if compiled else ""),
            graphed_step(
                model,
                cfg,
                prec,
                device,
                len(random_set[0][0]),
                precast=not each_use,
                compile=compiled,
            ),
            *sets["quantised"],
        )
    if name == "unfused_adamw":
        return Runner(
            name,
            "bucketed, fp32, AdamW's per-parameter loop (fused=None)",
            step(model, fused_adamw=False),
            *bucket_set,
        )
    if name == "threads1":
        return Runner(name, "bucketed, fp32, 1 thread", step(model, threads=1), *bucket_set)
    if name == "eager":
        return Runner(name, "bucketed (LengthBucketBatchSampler), fp32", step(model), *bucket_set)
    raise ValueError(f"unknown runner {name!r}; known: {RUNNERS}")


# --------------------------------------------------------------------------- main


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_preset(
    name: str, args: argparse.Namespace, lengths: np.ndarray, probe: MatmulProbe
) -> list[Runner]:
    cfg = build_config(name)
    device = probe.device
    E = len(cfg.data.emotions)
    per_clip = np.array([train_flops(cfg.model, int(a), int(v), E) for a, v in lengths])  # (N,)
    per_clip_exec = np.array(
        [train_flops(cfg.model, int(a), int(v), E, executed=True) for a, v in lengths]
    )
    epoch_flops = int(per_clip.sum())
    print(
        f"\n[{name}] useful training FLOPs (the issue's count): {per_clip.mean() / 1e9:.2f} GFLOP/clip on average, "
        f"{epoch_flops / 1e12:.1f} TFLOP per epoch of {len(lengths)} clips; executed by the package's model: "
        f"{per_clip_exec.mean() / 1e9:.2f} GFLOP/clip ({per_clip_exec.sum() / epoch_flops:.2f}x)"
    )
    ta, tv = int(np.median(lengths[:, 0])), int(np.median(lengths[:, 1]))
    fwd_terms = forward_flops(cfg.model, ta, tv, E)
    top = sorted(fwd_terms.items(), key=lambda kv: -kv[1])[:4]
    print(
        f"  forward at the median lengths ({ta}, {tv}): {sum(fwd_terms.values()) / 1e9:.2f} GFLOP; largest: "
        + ", ".join(f"{k} {v / 1e9:.2f}G" for k, v in top)
    )
    if not args.no_flop_check:
        one = make_batch(np.array([[ta, tv]]), cfg, seed=1)
        for label, executed in (
            ("as released (the issue's count)", False),
            ("as the package computes it", True),
        ):
            model = build_model(cfg)
            model.cfg.modality_dropout = 0.0
            if not executed:
                release_cross_attention(model)
            fwd = (executed_forward_flops if executed else forward_flops)(cfg.model, ta, tv, E)
            cf, cfb = counted_flops(model, one)
            print(
                f"  FlopCounterMode on one unpadded clip ({ta}, {tv}), model {label}: forward {cf / 1e9:.3f} G "
                f"(analytic {sum(fwd.values()) / cf:.3f}x), forward+backward {cfb / 1e9:.3f} G (analytic useful "
                f"{train_flops(cfg.model, ta, tv, E, executed=executed) / cfb:.3f}x)"
            )
    print(
        f"  SDPA backend for the audio self-attention at T={ta}: "
        f"{sdpa_backends(cfg.model, args.batch_size, ta, device)}"
    )

    B = args.batch_size
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(lengths))
    random_batches = [perm[i : i + B] for i in range(0, len(perm) - B + 1, B)]
    sampler = LengthBucketBatchSampler(lengths, B, seed=args.seed, epoch=1)
    bucketed = [b for b in sampler.global_batches() if len(b) == B]
    k = args.rounds
    sets, exec_flops = {}, {}
    for label, pool in (
        ("random", random_batches),
        ("bucketed", bucketed),
        ("quantised", bucketed),
    ):
        if label == "quantised" and not any(r.startswith("graphed") for r in args.runners):
            continue
        q = CUDA_LENGTH_QUANTUM if label == "quantised" else 1
        picked = quantile_pick(pool, lambda b: per_clip[b].sum(), k)
        all_pad = padding_fraction(pool, lengths, q)
        batches = [
            make_batch(lengths[b], cfg, seed=j, device=device, quantum=q)
            for j, b in enumerate(picked)
        ]
        sets[label] = (
            batches,
            [int(per_clip[b].sum()) for b in picked],
            padding_fraction(picked, lengths, q),
        )
        exec_flops[label] = [int(per_clip_exec[b].sum()) for b in picked]
        print(
            f"  {label} batches: padding {all_pad:.1%} over the epoch's {len(pool)} batches, "
            f"{sets[label][2]:.1%} in the {k} timed ones"
        )

    runners = []
    for r in args.runners:
        if r.startswith("compiled") and not args.compile:
            continue
        if ("fp16" in r or r == "bf16_cudnn") and device.type != "cuda":
            print(f"  {r}: skipped (CUDA only)")
            continue
        t0 = time.perf_counter()
        try:  # one runner failing (a GPU's one-shot check) must not cost the others' figures
            runner = build_runner(r, cfg, sets, device)
            warm = max(args.warmup, 2 if r.startswith("compiled") else 1)  # compiled: 2 shapes
            if r.startswith("graphed"):  # every timed shape: its eager first step, its capture
                warm = max(warm, 2 * len(runner.batches))
            for i in range(warm):
                runner.step(
                    runner.batches[(i // 2 if r.startswith("graphed") else i) % len(runner.batches)]
                )
        except Exception as exc:  # noqa: BLE001 - said and left out
            print(f"  {r}: FAILED in set-up or warm-up, left out: {type(exc).__name__}: {exc}")
            continue
        if r not in RELEASE_FORM_RUNNERS:
            runner.exec_flops = exec_flops["bucketed"]
        runner.warmup_s = time.perf_counter() - t0
        engine = getattr(runner.step, "engine", None)
        extra = f"; {engine.stats()}" if engine is not None else ""
        print(f"  {r}: warm-up {runner.warmup_s:.1f} s ({runner.what}){extra}", flush=True)
        runners.append(runner)

    for rnd in range(k):
        for runner in runners:
            j = (rnd + runners.index(runner)) % k  # each runner goes through all k batches
            runner.matmul.append(probe())
            c0, t0 = time.process_time(), time.perf_counter()
            runner.step(runner.batches[j])
            runner.step_s.append(time.perf_counter() - t0)
            runner.cpu_s.append(time.process_time() - c0)
            runner.done_flops.append(runner.flops[j])
            runner.done_exec.append((runner.exec_flops or runner.flops)[j])
            runner.samples.append(len(runner.batches[j]))
        print(
            f"  round {rnd + 1}/{k}: "
            + ", ".join(f"{r.name} {r.step_s[-1]:.2f}s@{r.matmul[-1] / 1e9:.0f}" for r in runners),
            flush=True,
        )
    # back to back: every timed batch once, one wait for the device at the end, as the trainer
    # runs (it waits for the device every 10 steps, for the loss check)
    for r in runners:
        sync(device)
        t0 = time.perf_counter()
        for b in r.batches:
            r.step(b, wait=False)
        sync(device)
        r.back_to_back = sum(len(b) for b in r.batches) / (time.perf_counter() - t0)  # type: ignore[attr-defined]
    for r in runners[: len(runners) if args.profile else 0]:
        profile_runner(r, args.profile, device)
    for r in runners:
        r.epoch_s = epoch_flops / r.rate  # type: ignore[attr-defined]
        r.epoch_flops = epoch_flops  # type: ignore[attr-defined]
    return runners


def _self_time(event, device_time: bool) -> float:
    """Self time of a profiler average in microseconds (device or CPU; torch < 2.4 named
    the device field after CUDA)."""
    if not device_time:
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or getattr(
        event, "self_cuda_time_total", 0.0
    )


def profile_runner(runner: Runner, steps: int, device: torch.device, top: int = 12) -> None:
    """``steps`` steps of ``runner`` under torch.profiler; prints the most expensive
    operations (CUDA: kernels by device time, and the device's busy share of the wall time;
    CPU: operators by self CPU time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            runner.step(runner.batches[i % len(runner.batches)], wait=False)
        sync(device)
        wall = time.perf_counter() - t0
    events = [
        e
        for e in prof.key_averages()
        if (e.device_type == DeviceType.CUDA) == on_gpu and _self_time(e, on_gpu) > 0
    ]
    total = sum(_self_time(e, on_gpu) for e in events)  # microseconds
    events.sort(key=lambda e: -_self_time(e, on_gpu))
    what = "kernels by device time" if on_gpu else "operators by self CPU time"
    busy = f", device busy {total / 1e6 / wall:.0%} of the wall time" if on_gpu else ""
    print(
        f"  profile {runner.name}: {steps} steps in {wall:.3f} s ({wall / steps * 1e3:.2f} ms/step)"
        f"{busy}; top {what}:",
        flush=True,
    )
    for e in events[:top]:
        t = _self_time(e, on_gpu)
        print(
            f"    {t / max(total, 1e-9):6.1%} {t / 1e3 / steps:9.3f} ms/step {e.count // steps:5d}x/step  "
            f"{e.key[:90]}"
        )


def report(name: str, runners: list[Runner], best: float) -> None:
    print(
        f"\n[{name}] summary; util adj = median over steps of useful FLOP/s (the issue's count) / fp32 matmul "
        f"rate just before the step; exec util = the same with the FLOPs the step executes; util best = useful FLOP/s / best fp32 matmul rate of the run ({best / 1e9:.0f} GFLOP/s)"
    )
    head = (
        f"{'runner':<14} {'padding':>7} {'steps':>5} {'s/step':>7} {'samples/s':>9} {'GFLOP/s':>8} "
        f"{'util adj':>8} {'exec util':>9} {'util best':>9} {'epoch min':>9} {'at best':>7} {'CPU share':>9}"
    )
    print(head)
    for r in runners:
        print(
            f"{r.name:<14} {r.padding:>7.1%} {len(r.step_s):>5} {statistics.median(r.step_s):>7.2f} "
            f"{r.samples_s:>9.2f} {r.rate / 1e9:>8.1f} {r.util_adjacent:>8.1%} {r.exec_util_adjacent:>9.1%} "
            f"{r.rate / best:>9.1%} "
            f"{r.epoch_s / 60:>9.1f} {r.epoch_flops / (r.util_adjacent * best) / 60:>7.1f} "
            f"{sum(r.cpu_s) / sum(r.step_s) / torch.get_num_threads():>9.2f}"
        )
    print(
        "  back to back (each timed batch once, one wait for the device at the end; samples/s): "
        + ", ".join(f"{r.name} {r.back_to_back:.0f}" for r in runners)
    )
    by = {r.name: r for r in runners}
    for ref in ("plain", "before"):
        if ref in by:
            print(
                f"  epoch time vs {ref}: "
                + ", ".join(
                    f"{r.name} {r.epoch_s / by[ref].epoch_s:.2f}x" for r in runners if r.name != ref
                )
            )
    for a, b in (
        ("bf16", "eager"),
        ("bf16_precast", "eager"),
        ("bf16_precast", "bf16"),
        ("fp16_precast", "fp16"),
        ("bf16_cudnn", "eager"),
        ("graphed_bf16", "eager"),
        ("graphed_bf16", "bf16"),
        ("graphed_bf16", "graphed_bf16_each_use"),
        ("graphed_bf16_compiled", "graphed_bf16"),
        ("graphed_fp32", "eager"),
        ("graphed_fp16", "eager"),
        ("graphed_fp16", "fp16_precast"),
        ("compiled", "eager"),
        ("compiled_bf16", "bf16"),
        ("eager", "sdpa_ca"),
        ("fp16", "eager"),
        ("eager", "unfused_adamw"),
        ("threads1", "eager"),
    ):
        if a in by and b in by:
            print(
                f"  {a} vs {b}: useful FLOP/s {by[a].rate / by[b].rate:.2f}x (util adj "
                f"{by[a].util_adjacent / by[b].util_adjacent:.2f}x)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", nargs="+", default=["paper", "official"])
    ap.add_argument(
        "--runners",
        nargs="+",
        default=["plain", "before", "sdpa_ca", "eager", "bf16", "compiled", "compiled_bf16"],
        choices=RUNNERS,
        help="compiled* only run with --compile",
    )
    ap.add_argument("--compile", action="store_true", help="also time torch.compile runners")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--rounds", "--steps", type=int, default=6, help="timed steps per runner (one per round)"
    )
    ap.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per runner first (GPU: a few)"
    )
    ap.add_argument(
        "--device", default="cpu", help="cpu | cuda | cuda:N (the matmul probe runs there too)"
    )
    ap.add_argument("--clips", type=int, default=EPOCH_CLIPS, help="clips in the synthetic epoch")
    ap.add_argument("--seed", type=int, default=3407)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-flop-check", action="store_true")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timing, profile N steps of each runner and print its top operations",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
        f"{cpu_has_bf16()}; load average at start {loadavg()}"
    )
    lengths = abaw_like_lengths(args.clips, seed=args.seed)
    a, v = lengths[:, 0][lengths[:, 0] > 0], lengths[:, 1][lengths[:, 1] > 0]
    print(
        f"length mix ({args.clips} clips): audio mean {a.mean() / 50:.2f} s, p95 {np.percentile(a, 95) / 50:.2f} s "
        f"({(a == 599).mean():.1%} at the 599 cap), vision mean {v.mean():.0f}, p95 {np.percentile(v, 95):.0f} "
        f"frames; missing audio {(lengths[:, 0] == 0).mean():.1%}, vision {(lengths[:, 1] == 0).mean():.1%}"
    )
    device = torch.device(args.device)
    n = 2048 if device.type == "cpu" else 8192  # a GPU needs a bigger product to reach its rate
    if device.type == "cuda":
        print(
            f"device: {torch.cuda.get_device_name(device)}; TF32 matmul "
            f"{torch.backends.cuda.matmul.allow_tf32} (fp32 rows are true fp32 unless enabled)"
        )
    probe = MatmulProbe(torch.float32, n, device)
    start = probe(repeats=10, warmup=3)
    rates = {"fp32": start, "bf16": MatmulProbe(torch.bfloat16, n, device)(repeats=10, warmup=3)}
    if device.type == "cuda":
        rates["fp16"] = MatmulProbe(torch.float16, n, device)(repeats=10, warmup=3)
    print(
        f"matmul {n}^3: "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items())
        + " (best of 10); utilisation below is against the fp32 rate, as the issue states it"
    )
    results = {}
    for name in args.presets:
        results[name] = run_preset(name, args, lengths, probe)
    end = probe(repeats=10)
    best = max([start, end] + [x for rs in results.values() for r in rs for x in r.matmul])
    print(
        f"\nfp32 matmul at the end {end / 1e9:.0f} GFLOP/s; best in the run {best / 1e9:.0f} GFLOP/s; "
        f"load average at end {loadavg()}"
    )
    for name, runners in results.items():
        report(name, runners, best)


if __name__ == "__main__":
    main()
