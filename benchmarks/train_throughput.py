"""Training throughput of the TAEMI presets at paper dimensions, and how close it is to the
machine's matmul rate.

One optimiser step is the step of ``taemi.train.trainer.train``: autocast forward, MSE in
float32, ``zero_grad``, (scaled) backward, ``unscale_``, ``clip_grad_value_(100)``, AdamW
step, scaler update, LR-scheduler step. Inputs are random and EVERY sequence is full length
(T_a = 599, T_v = 400, no padding, no missing modality): the worst case per clip. Real clips
average fewer frames, but a batch is padded to its longest clip, so one long clip per batch
makes the whole batch this expensive.

Printed, all measured in the same run:

- forward FLOPs per sample, counted analytically from the configured shapes (formula in
  :func:`forward_flops`), checked against ``torch.utils.flop_counter.FlopCounterMode``;
- the machine's matmul rate (best of several square matmuls in the run's dtype), at the
  start, at the end and just before every timed step (the load of a shared machine changes
  from one step to the next);
- per preset (and per eager/compiled mode): seconds per step, samples/s, achieved training
  FLOP/s (3 x forward FLOPs x samples/s) and utilisation = achieved / matmul rate, both
  against the rate measured just before each step and against the best rate of the run;
  on CPU the share of the cores the process actually got (CPU time / wall / threads);
- the fused scaled-dot-product-attention backend PyTorch picks for the self-attention
  shapes, in training (attention dropout on) and in evaluation.

Usage::

    python benchmarks/train_throughput.py                       # CPU defaults, ~1.5-2.5 min on 2 cores
    python benchmarks/train_throughput.py --device cuda --precision fp16 --compile
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taemi.config import ModelConfig, RunConfig, build_config
from taemi.model.checkpoint import build_model
from taemi.model.taemi import Batch
from taemi.train.runtime import autocast, resolve_device, resolve_precision
from taemi.train.schedule import make_scheduler

T_A, T_V = 599, 400  # paper maxima: 12 s of wav2vec2 frames at ~50/s; 400 face frames


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

    Paper preset at (599, 400): ~9.35 GFLOP; official: ~1.9 GFLOP (the self-attention
    FFN dominates the paper preset). Training is taken as 3x forward (backward computes
    the gradients of inputs and of weights, each about one forward), slightly over-counting
    the first layers whose input gradient is never needed.
    """
    dims = {"audio": cfg.audio_dim, "vision": cfg.vision_dim, "text": cfg.text_dim}
    lengths = {"audio": t_a, "vision": t_v, "text": 1}  # text as K/V: the vector as one step
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


def counted_flops(model: torch.nn.Module, batch: Batch) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of ``batch`` per FlopCounterMode, per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        pred = model(batch)
    fwd = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        pred = model(batch)
        F.mse_loss(pred.float(), batch.target).backward()
    model.zero_grad(set_to_none=True)
    n = len(batch)
    return fwd // n, counter.get_total_flops() // n


# --------------------------------------------------------------------------- machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulProbe:
    """FLOP/s of an (n x n) @ (n x n) product in ``dtype``; the operands are made once."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        g = torch.Generator(device=device).manual_seed(0)
        self.a = torch.randn(n, n, generator=g, device=device).to(dtype)
        self.b = torch.randn(n, n, generator=g, device=device).to(dtype)
        self.device, self.n = device, n

    def __call__(self, repeats: int, warmup: int = 1) -> float:
        """Best rate of ``repeats`` timed products after ``warmup`` untimed ones."""
        for _ in range(warmup):
            torch.matmul(self.a, self.b)
        sync(self.device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(self.a, self.b)
            sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return 2 * self.n**3 / best


def sdpa_backends(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int) -> str:
    """The fused-attention choice for the self-attention shapes (private torch API: best effort)."""
    try:
        from torch.nn.attention import SDPBackend

        hd = cfg.hidden // cfg.heads
        q = torch.zeros(batch, cfg.heads, T_A, hd, device=device, dtype=dtype)
        mask = torch.ones(batch, 1, 1, T_A, device=device, dtype=torch.bool)
        names = []
        for label, p in (("train", cfg.attn_dropout), ("eval", 0.0)):
            names.append(
                f"{label} (dropout {p}): {SDPBackend(torch._fused_sdp_choice(q, q, q, mask, p, False)).name}"
            )
        return "; ".join(names)
    except (ImportError, AttributeError, RuntimeError, TypeError, ValueError) as exc:  # private API
        return f"unknown ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------- timing


def random_batch(cfg: RunConfig, batch_size: int, device: torch.device, seed: int = 0) -> Batch:
    """Full-length random inputs (no padding, nothing missing) and random targets."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    B = batch_size
    return Batch(
        audio=torch.randn(B, T_A, m.audio_dim, generator=g),  # (B, T_a, D_a)
        audio_mask=torch.ones(B, T_A, dtype=torch.bool),
        vision=torch.randn(B, T_V, m.vision_dim, generator=g),  # (B, T_v, D_v)
        vision_mask=torch.ones(B, T_V, dtype=torch.bool),
        text=torch.randn(B, m.text_dim, generator=g),  # (B, D_t)
        missing=torch.zeros(B, 3, dtype=torch.bool),
        target=torch.rand(B, len(cfg.data.emotions), generator=g),  # (B, E)
    ).to(device)


@dataclass
class Timing:
    step_s: list[float]  # wall seconds of each timed step
    cpu_s: list[float]  # this process's CPU seconds (user + sys, all threads) of each timed step
    matmul: list[float]  # matmul FLOP/s measured just before each timed step
    first_s: float  # first warm-up step (includes compilation when compiled)
    peak_mem: int | None  # CUDA: max allocated bytes; CPU: None


def time_training(
    cfg: RunConfig,
    batch: Batch,
    device: torch.device,
    precision: str,
    measure_matmul: Callable[[], float],
    *,
    compile_: bool,
    warmup: int,
    steps: int,
    min_seconds: float,
) -> Timing:
    """Time full optimiser steps, as the trainer does them, after ``warmup`` untimed ones.

    At least ``steps`` steps, more (up to 10x) until ``min_seconds`` of steps are timed, so
    that a cheap preset gets more samples. Just before each timed step the matmul rate is
    measured again: on a shared machine the load changes from one step to the next, and a
    step is compared with the rate the machine gave at that moment.
    """
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    fwd = torch.compile(model) if compile_ else model
    tc = cfg.train
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas
    )
    scheduler = make_scheduler(optimizer, 10, 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> tuple[float, float]:
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(device, precision):
            pred = fwd(batch)  # (B, E)
        loss = F.mse_loss(pred.float(), batch.target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_value_(model.parameters(), tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss.item()  # the trainer reads the loss every step (a device sync)
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    first, _ = step()
    for _ in range(warmup - 1):
        step()
    t = Timing([], [], [], first, None)
    while len(t.step_s) < steps or (sum(t.step_s) < min_seconds and len(t.step_s) < 10 * steps):
        t.matmul.append(measure_matmul())
        wall, cpu = step()
        t.step_s.append(wall)
        t.cpu_s.append(cpu)
    if device.type == "cuda":
        t.peak_mem = torch.cuda.max_memory_allocated(device)
    return t


@dataclass
class Row:
    preset: str
    mode: str  # eager | compiled
    fwd_flops: int  # per sample
    batch_size: int
    timing: Timing
    train_factor: float = 3.0  # forward+backward / forward: counted by FlopCounterMode, else 3

    @property
    def median(self) -> float:
        return statistics.median(self.timing.step_s)

    @property
    def samples_s(self) -> float:
        return self.batch_size / self.median

    @property
    def achieved(self) -> float:
        """Training FLOP/s = (forward+backward FLOPs) x samples/s (median step)."""
        return self.train_factor * self.fwd_flops * self.samples_s

    @property
    def util_adjacent(self) -> float:
        """Median over steps of (that step's training FLOP/s) / (matmul rate just before it)."""
        t = self.timing
        return statistics.median(
            self.train_factor * self.fwd_flops * self.batch_size / s / r
            for s, r in zip(t.step_s, t.matmul)
        )

    @property
    def cpu_share(self) -> float:
        """CPU seconds / (wall seconds x threads): below 1 = threads idle (serial parts) or
        the cores taken by other processes."""
        t = self.timing
        return sum(t.cpu_s) / (sum(t.step_s) * torch.get_num_threads())


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", nargs="+", default=["paper", "official"], help="presets to time")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, help="min timed steps (default: 2 on CPU, 20 on CUDA)")
    ap.add_argument(
        "--min-seconds",
        type=float,
        default=10.0,
        help="keep timing (up to 10x --steps) until this many seconds are timed",
    )
    ap.add_argument("--warmup", type=int, help="warm-up steps (default: 1 on CPU, 5 on CUDA)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="fp16 = autocast + GradScaler (CUDA only); bf16 = autocast",
    )
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    ap.add_argument("--matmul-size", type=int, help="square matmul size (default 2048; CUDA 8192)")
    ap.add_argument("--no-flop-check", action="store_true", help="skip the FlopCounterMode check")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    on_cuda = device.type == "cuda"
    steps = args.steps if args.steps is not None else (20 if on_cuda else 2)
    warmup = max(1, args.warmup if args.warmup is not None else (5 if on_cuda else 1))
    mm_n = args.matmul_size or (8192 if on_cuda else 2048)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def loadavg() -> str:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())

    dev_name = torch.cuda.get_device_name(device) if on_cuda else platform.machine()
    print(
        f"torch {torch.__version__}, device {device} ({dev_name}), {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, precision {precision}, batch {args.batch_size}"
    )
    print(f"load average at start: {loadavg()}")
    print(
        f"inputs: random, every sequence full length (T_a={T_A} x 1027, T_v={T_V} x 768, "
        f"text 768, nothing missing): the worst case per clip"
    )
    print(
        f"steps: {warmup} warm-up, then >= {steps} timed (more until {args.min_seconds:g} s), "
        f"each preceded by a {mm_n}^3 matmul measurement (best of 3)"
    )

    probe = MatmulProbe(device, dtype, mm_n)
    rates = {precision: probe(repeats=10, warmup=3)}
    if precision != "fp32":
        rates["fp32"] = MatmulProbe(device, torch.float32, mm_n)(repeats=10, warmup=3)
    for p, r in rates.items():
        print(f"matmul {mm_n}x{mm_n} {p}: {r / 1e9:.1f} GFLOP/s (best of 10)")

    def adjacent_rate() -> float:
        return probe(repeats=3)

    rows: list[Row] = []
    for name in args.presets:
        cfg = build_config(name)
        flops = forward_flops(cfg.model, T_A, T_V, len(cfg.data.emotions))
        fwd = sum(flops.values())
        params = sum(p.numel() for p in build_model(cfg).parameters())
        print(
            f"\n[{name}] {params / 1e6:.2f} M parameters; forward {fwd / 1e9:.2f} GFLOP/sample "
            f"(analytic)"
        )
        factor = 3.0
        top = sorted(flops.items(), key=lambda kv: -kv[1])[:4]
        print("  largest terms: " + ", ".join(f"{k} {v / 1e9:.2f}G" for k, v in top))
        if not args.no_flop_check:
            m = build_model(cfg).to(device)
            cf, cfb = counted_flops(m, random_batch(cfg, 1, device, seed=1))
            print(
                f"  FlopCounterMode: forward {cf / 1e9:.2f} GFLOP (analytic/counted {fwd / cf:.3f}), "
                f"forward+backward {cfb / 1e9:.2f} GFLOP = {cfb / cf:.2f}x forward (used for training FLOP/s)"
            )
            factor = cfb / cf
            del m
        backends = sdpa_backends(cfg.model, device, dtype, args.batch_size)
        print(f"  SDPA backend for the self-attention shapes: {backends}")
        batch = random_batch(cfg, args.batch_size, device)
        for mode in ["eager", "compiled"] if args.compile else ["eager"]:
            t = time_training(
                cfg,
                batch,
                device,
                precision,
                adjacent_rate,
                compile_=mode == "compiled",
                warmup=warmup,
                steps=steps,
                min_seconds=args.min_seconds,
            )
            rows.append(Row(name, mode, fwd, args.batch_size, t, factor))
            print(
                f"  {mode}: first warm-up step {t.first_s:.1f} s; timed steps (s) "
                + " ".join(f"{s:.2f}" for s in t.step_s)
                + "; matmul just before (GFLOP/s) "
                + " ".join(f"{r / 1e9:.0f}" for r in t.matmul)
            )
        del batch
        if on_cuda:
            torch.cuda.empty_cache()

    after = probe(repeats=10)
    best = max([rates[precision], after] + [x for r in rows for x in r.timing.matmul])
    print(
        f"\nmatmul {mm_n}x{mm_n} {precision} at the end: {after / 1e9:.1f} GFLOP/s (best of 10); "
        f"best seen in this run {best / 1e9:.1f} GFLOP/s; load average at end: {loadavg()}"
    )
    print(
        f"\nsummary ({precision}, batch {args.batch_size}). util adj = median over steps of training "
        f"FLOP/s / matmul rate measured just before the step; util best = median-step training "
        f"FLOP/s / best matmul rate of the run ({best / 1e9:.1f} GFLOP/s). Training FLOPs = 3 x "
        f"analytic forward."
    )
    head = (
        f"{'preset':<10} {'mode':<9} {'steps':>5} {'s/step med':>10} {'min':>7} {'max':>7} "
        f"{'samples/s':>9} {'GFLOP/s':>8} {'util adj':>8} {'util best':>9} {'1st step s':>10}"
    )
    head += f" {'peak GiB':>8}" if on_cuda else f" {'CPU share':>9}"
    print(head)
    for r in rows:
        t = r.timing
        line = (
            f"{r.preset:<10} {r.mode:<9} {len(t.step_s):>5} {r.median:>10.3f} {min(t.step_s):>7.3f} "
            f"{max(t.step_s):>7.3f} {r.samples_s:>9.2f} {r.achieved / 1e9:>8.1f} "
            f"{r.util_adjacent:>8.1%} {r.achieved / best:>9.1%} {t.first_s:>10.1f}"
        )
        line += f" {t.peak_mem / 2**30:>8.2f}" if on_cuda else f" {r.cpu_share:>9.2f}"
        print(line)
    for r in rows[1:]:
        b = rows[0]
        print(
            f"samples/s {r.preset}/{r.mode} vs {b.preset}/{b.mode}: {r.samples_s / b.samples_s:.2f}x"
        )


if __name__ == "__main__":
    main()
