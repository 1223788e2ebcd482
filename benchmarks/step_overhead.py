"""What a training step costs besides its arithmetic: the operations it dispatches (each one
a kernel launch on a GPU) and its time at shapes too small for the arithmetic to matter, for
the trainer's step engines and precisions, side by side in one run.

At the recipe's batch size a GPU step is bound by launches and host work (issue 14): an
eager bf16 step was slower than fp32 on an H200, and a captured step still pays a graph
node per kernel. Both scale with the operations per step, which this counts on any device
(a dispatch mode sees every operation below autograd and autocast, backward and optimiser
included; views are left out: they launch nothing). On a CPU the time of a tiny step is
the same host cost.

Runners (the package's own engines, :mod:`taemi.train.step`; the trainer's AdamW, clipping
and schedule):

- ``fp32``: the eager step in fp32;
- ``bf16_each_use``: the eager step under bf16 autocast with ``train.precast_weights=false``
  (autocast casts each weight at each use and casts its gradient back);
- ``bf16``: the same with the weights cast once per step (``taemi.train.precast``, the
  default);
- ``fp16_each_use``, ``fp16`` (CUDA): the same in fp16 with the grad scaler;
- ``graphed_fp32``, ``graphed_bf16_each_use``, ``graphed_bf16``, ``graphed_fp16`` (CUDA; the
  grad scaler's cycle captured with it): the captured step (``GraphedStep``: CUDA graphs on
  CUDA, its eager stand-in elsewhere). Its operation count is that of the step it captures
  (the first, eager step of the shape).

- ``bf16_no_autocast`` (a reference, not a trainer path): the same bf16 kernels without
  autocast: every parameter a bf16 copy (refreshed once per step), the batch's features cast
  to bf16, the forward run outside autocast (layer norms and softmax in bf16 too). Against
  ``bf16`` it is autocast's own cost (its dispatch and its activation casts) with the
  kernels' dtype held equal; against ``fp32`` it is what the CPU's bf16 kernels cost at these
  sizes (oneDNN's bf16 matrix products have a larger fixed cost per call than fp32's), which
  a GPU does not share: compare precisions on a CPU through it, not through ``fp32``.

Each clip has the same lengths (``--lengths``, default 16 audio and 8 face steps), so every
step has one shape. Timing: round-robin, each round runs ``--burst`` steps of each runner
back to back and waits for the device once; the median over rounds of seconds per step.

Usage::

    python benchmarks/step_overhead.py                          # CPU, paper + official, ~1 min
    python benchmarks/step_overhead.py --device cuda --batch-size 32
    python benchmarks/step_overhead.py --batch-size 32 --lengths 350 230 --rounds 3  # counts at real sizes
    python benchmarks/step_overhead.py --set model.hidden=16 --set model.sa_ffn=32 --set model.head_hidden=16
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_throughput import loadavg, make_batch, sync

from taemi.config import RunConfig, TrainConfig, build_config, parse_overrides
from taemi.data.batch import Batch
from taemi.runtime import attention_backends
from taemi.train.modes import build_model
from taemi.train.schedule import make_scheduler
from taemi.train.step import EagerStep, GraphedStep
from taemi.train.trainer import make_optimizer

#: Running against a checkout from before ``taemi.train.precast`` (for before/after counts:
#: ``PYTHONPATH=old/src python benchmarks/step_overhead.py --runners fp32 bf16 graphed_fp32
#: graphed_bf16``): every runner then steps as that checkout does.
BEFORE_PRECAST = "precast_weights" not in {f.name for f in fields(TrainConfig)}
RUNNERS = (
    "fp32",
    "bf16_each_use",
    "bf16",
    "fp16_each_use",
    "fp16",
    "graphed_fp32",
    "graphed_bf16_each_use",
    "graphed_bf16",
    "graphed_fp16",
    "bf16_no_autocast",
)


class NoAutocastStep:
    """The eager step in bf16 without autocast (the ``bf16_no_autocast`` reference)."""

    def __init__(self, model: torch.nn.Module, optimizer, cfg: RunConfig, device: torch.device):
        from taemi.train.precast import PrecastWeights  # not in a BEFORE_PRECAST checkout

        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.weights = PrecastWeights(model, names, torch.bfloat16)
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device

    def compute(self, group: list[Batch], n_group: float) -> torch.Tensor:
        (batch,) = group
        cast = {
            f.name: x.to(torch.bfloat16)
            if isinstance(x := getattr(batch, f.name), torch.Tensor)
            and x.is_floating_point()
            and f.name != "target"
            else x
            for f in fields(Batch)
        }
        with attention_backends(self.device):
            pred = self.weights.forward(Batch(**cast))  # (B, E) in bf16
        loss = torch.nn.functional.mse_loss(pred.float(), batch.target)
        self.weights.backward(loss)
        return loss.detach()

    def update(self) -> None:
        from taemi.train.step import clip_gradients

        clip_gradients(self.model, self.cfg)
        self.optimizer.step()

    def stats(self) -> dict:
        return self.weights.stats()


class OpCounter(TorchDispatchMode):
    """Counts the non-view operations dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@dataclass
class Runner:
    name: str
    step: Callable[[Batch], None]
    engine: EagerStep | GraphedStep
    ops: collections.Counter = field(default_factory=collections.Counter)
    step_s: list[float] = field(default_factory=list)


def build_runner(name: str, cfg: RunConfig, device: torch.device) -> Runner:
    """The trainer's engine for ``name``: its model, capturable fused AdamW where captured,
    the schedule stepped after each step."""
    precision = name.removeprefix("graphed_").removesuffix("_each_use").removesuffix("_no_autocast")
    precast = not name.endswith("_each_use")
    if BEFORE_PRECAST:  # an older checkout: its only form is autocast at each use
        if not precast:
            raise SystemExit(f"{name}: this checkout has no precast weights; leave it out")
        precast = False
    else:
        cfg = replace(cfg, train=replace(cfg.train, precast_weights=precast))
    torch.manual_seed(0)
    model = build_model(cfg).train().to(device)
    graphed = name.startswith("graphed")
    optimizer = make_optimizer(cfg, model, capturable=graphed)
    scheduler = make_scheduler(optimizer, 10, 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if name == "bf16_no_autocast":
        engine = NoAutocastStep(model, optimizer, cfg, device)
    elif graphed:
        dims = {
            "audio": cfg.model.audio_dim,
            "vision": cfg.model.vision_dim,
            "text": cfg.model.text_dim,
        }
        kw = {} if BEFORE_PRECAST else {"scaler": scaler}
        engine = GraphedStep.build(
            model, optimizer, cfg, device, precision, dims, max_shapes=8, **kw
        )
    else:
        kw = {} if BEFORE_PRECAST else {"precast": precast}
        engine = EagerStep(model, model, optimizer, scaler, cfg, device, precision, **kw)

    def step(batch: Batch) -> None:
        engine.compute([batch], len(batch))
        engine.update()
        scheduler.step()

    return Runner(name, step, engine)


def run_preset(name: str, args, device: torch.device) -> list[Runner]:
    ta, tv = args.lengths
    cfg = build_config(
        name, [("train.batch_size", args.batch_size), *parse_overrides(args.set or [])]
    )
    lengths = np.tile([[ta, tv]], (args.batch_size, 1))
    batch = make_batch(lengths, cfg, seed=0, device=device)
    runners = []
    for runner_name in args.runners:
        try:  # one runner failing must not cost the others' figures
            r = build_runner(runner_name, cfg, device)
            # the second step: the first also finds the weights to precast and makes the
            # optimiser's state; a graphed runner's second step is the capture (on a CPU, its
            # stand-in runs the step once)
            r.step(batch)
            counter = OpCounter()
            with counter:
                r.step(batch)
            r.ops = counter.ops
            for _ in range(args.warmup):
                r.step(batch)
            sync(device)
        except Exception as exc:  # noqa: BLE001 - said and left out
            print(f"  {runner_name}: FAILED, left out: {type(exc).__name__}: {exc}")
            continue
        runners.append(r)
    for _ in range(args.rounds):
        for r in runners:
            t0 = time.perf_counter()
            for _ in range(args.burst):
                r.step(batch)
            sync(device)
            r.step_s.append((time.perf_counter() - t0) / args.burst)
    return runners


def report(preset: str, runners: list[Runner], args) -> None:
    ta, tv = args.lengths
    print(
        f"\n{preset}: batch {args.batch_size}, {ta} audio + {tv} face steps per clip; "
        f"median of {args.rounds} rounds x {args.burst} steps"
    )
    ref = next((r for r in runners if r.name == "fp32"), runners[0])
    ref_s = statistics.median(ref.step_s)
    print(
        f"  {'runner':24s} {'ops/step':>9s} {'casts':>6s} {'add_':>5s} {'ms/step':>8s} {'range':>13s} {'vs ' + ref.name:>8s}"
    )
    for r in runners:
        s = statistics.median(r.step_s)
        print(
            f"  {r.name:24s} {sum(r.ops.values()):9d} {r.ops['_to_copy']:6d} {r.ops['add_']:5d} "
            f"{s * 1e3:8.2f} {min(r.step_s) * 1e3:6.2f}-{max(r.step_s) * 1e3:<6.2f} "
            f"{ref_s / s:7.2f}x"
        )
    for r in runners:
        top = ", ".join(f"{k} {v}" for k, v in r.ops.most_common(args.top))
        precast = r.engine.stats().get("precast_parameters", 0)
        print(f"  {r.name}: precast parameters {precast}; top ops: {top}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", nargs="+", default=["paper", "official"])
    ap.add_argument("--runners", nargs="+", choices=RUNNERS, help="default: all this device runs")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs=2, default=(16, 8), metavar=("AUDIO", "FACE"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--burst", type=int, default=5, help="steps back to back per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=8, help="operations listed per runner")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="config override (repeatable), e.g. model.hidden=16: small weights leave the "
        "per-operation host cost, what a launch-bound GPU step waits on",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.runners is None:
        args.runners = [r for r in RUNNERS if device.type == "cuda" or "fp16" not in r]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"torch {torch.__version__}, {device} ({name or platform.machine()}), {os.cpu_count()} "
        f"CPUs, torch threads {torch.get_num_threads()}; load average {loadavg()}"
    )
    for preset in args.presets:
        report(preset, run_preset(preset, args, device), args)
    print(f"\nload average at end {loadavg()}")


if __name__ == "__main__":
    main()
