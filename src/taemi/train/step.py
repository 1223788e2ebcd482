"""One optimiser step of the training loop: eager, or replayed from a CUDA graph per batch shape.

The trainer asks a step engine for two things per optimiser step:

- :meth:`compute` (forward + backward of the step's micro-batches; for a captured step also
  the gradient clipping and the AdamW update) -> the micro-batches' losses, on the device;
  in bf16/fp16 in one process, with the weights cast once per step
  (:class:`taemi.train.precast.PrecastWeights`, ``train.precast_weights``);
- :meth:`update` (clipping + optimiser step, unless :meth:`compute` already did them).

Between the two the trainer checks the losses (every step on the CPU, every
``ACCELERATOR_LOSS_CHECK_STEPS`` on an accelerator), and after them it steps the
learning-rate schedule.

:class:`EagerStep` is the recipe as written (autocast forward, MSE in float32, backward with
the grad scaler, unscale, clip, AdamW); every device, precision, mode and process count runs it.

:class:`GraphedStep` exists because at the recipe's batch size (32 clips) a GPU step is bound
by kernel launches and host work, not by the GPU (issue 14: 0.016 s per fp32 step on an H200
whose arithmetic needs a tenth of that). It captures the WHOLE step (forward, loss, backward,
clipping, fused AdamW) in one CUDA graph per batch shape and replays it:

- batch shapes are finite because sequence lengths are padded to a multiple of
  ``data.length_quantum`` (32 on CUDA: ~60 shapes over the corpus's length mix, ~11% padding
  instead of ~5.5%); at most ``train.graph_shapes`` shapes get a graph, the rest run eagerly;
- the first step of a shape runs eagerly (a real step, which also warms up what a capture
  must not initialise: cuBLAS handles, the optimiser's state, the gradients); the second
  captures the graph and replays it, and so does every later one;
- inputs are copied into static buffers, one flat float32 buffer per field sized for the
  largest shape the config allows, viewed at each shape (every graph reads the same
  addresses); the gradients and the optimiser state are ordinary tensors shared by every
  graph, and the graphs share one memory pool (they never run concurrently);
- backward writes the gradients over those tensors (:meth:`PrecastWeights.backward`: one
  multi-tensor copy, where ``loss.backward()`` into kept gradients would zero them and add
  into each with its own kernel), and in bf16 the weights are cast once per step;
- AdamW is ``fused=True, capturable=True`` with the learning rate as a device tensor, which
  the schedule fills in place after each step (one small kernel): the captured update reads
  the current rate;
- the loss stays on the device; nothing in a replayed step waits for the host.

With ``train.compile`` the forward (and backward) it captures is compiled with dynamic shapes
(:class:`PrecastWeights` with ``compile``): fused kernels, compiled on the first eager steps,
then captured like the eager ones.

fp16 (cards without bf16) is captured with its loss scaling: the grad scaler's whole cycle
(scale the loss, unscale the gradients and look for infs and NaNs, skip the update on an
overflow, grow or back off the scale) runs on the device when the optimiser is fused AdamW,
which reads the scaler's ``found_inf`` tensor and skips its own update; nothing waits for
the host, so the scaler's cycle is captured with the step and the scale lives in the
scaler's own tensors (saved with ``state.pt`` as before).

Not captured: several processes (DDP's all-reduce), gradient accumulation, fine-tuning (raw
waveforms and images: their shapes are not bounded). Those run :class:`EagerStep`.

On a machine without CUDA, :class:`GraphedStep` runs with :class:`EagerCapture`, which
"captures" by keeping the step function and "replays" by calling it on the static buffers:
the same bookkeeping (shapes, buffers, counters, limits) as on a GPU, executed eagerly, so
that CPU tests cover everything but the CUDA graph itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from taemi.config import RunConfig
from taemi.data.batch import Batch, padded_length
from taemi.runtime import attention_backends, autocast
from taemi.train.precast import PrecastWeights

log = logging.getLogger(__name__)


def clip_gradients(model: torch.nn.Module, cfg: RunConfig) -> None:
    """The recipe's clipping: by value (the release) or by norm; nothing when ``grad_clip`` is 0.
    Neither waits for the device (the norm is not read back)."""
    if cfg.train.grad_clip <= 0:
        return
    if cfg.train.grad_clip_mode == "value":
        torch.nn.utils.clip_grad_value_(model.parameters(), cfg.train.grad_clip)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)


def scaled_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: RunConfig,
) -> None:
    """Unscale (looking for infs and NaNs), clip, AdamW (skipped by the scaler on an fp16
    overflow), scale update; a disabled scaler passes straight through. With fused AdamW
    nothing here waits for the host: the optimiser reads the scaler's ``found_inf`` tensor."""
    scaler.unscale_(optimizer)
    clip_gradients(model, cfg)
    scaler.step(optimizer)
    scaler.update()


class EagerStep:
    """The recipe's step, op by op (any device, precision, mode, process count)."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        cfg: RunConfig,
        device: torch.device,
        precision: str,
        world: int = 1,
        precast: bool = False,
    ):
        self.model, self.train_model = model, train_model
        self.optimizer, self.scaler = optimizer, scaler
        self.cfg, self.device, self.precision, self.world = cfg, device, precision, world
        # ``precast``: bf16/fp16 with the weights cast once per step (taemi.train.precast),
        # the trainer's choice for frozen features in one process; DDP's gradient hooks and a
        # compiled or wrapped model keep autocast's per-use casts whatever is asked
        self.precast_wanted = (
            precast and precision != "fp32" and world == 1 and train_model is model
        )
        self.weights: PrecastWeights | None = None

    def compute(self, group: list[Batch], n_group: float) -> torch.Tensor:
        """Forward and backward of the step's micro-batches (on the device already); each
        micro-batch's mean loss is weighted by its share of the step's ``n_group`` clips.
        Returns their losses (len(group),) on the device."""
        if self.precast_wanted and self.weights is None:
            self.weights = PrecastWeights.for_model(
                self.model, group[0], self.device, self.precision
            )
        if self.weights is None:
            self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for j, batch in enumerate(group):
            sync = self.world == 1 or j == len(group) - 1  # all-reduce once per optimiser step
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                with attention_backends(self.device), autocast(self.device, self.precision):
                    pred = (
                        self.train_model(batch)
                        if self.weights is None
                        else self.weights.forward(batch)
                    )  # (B, E)
                loss = F.mse_loss(pred.float(), batch.target)
                weight = len(batch) / n_group
                scaled = self.scaler.scale(loss * weight if weight != 1.0 else loss)
                if self.weights is None:
                    scaled.backward()
                else:
                    self.weights.backward(scaled, accumulate=j > 0)
            losses.append(loss.detach())
        return torch.stack(losses)

    def update(self) -> None:
        scaled_update(self.model, self.optimizer, self.scaler, self.cfg)

    def stats(self) -> dict:
        return {"engine": "eager", **(self.weights.stats() if self.weights else {})}


# --------------------------------------------------------------------------- captured steps


class CudaCapture:
    """Captures a function in a CUDA graph (all graphs share one memory pool)."""

    name = "cuda_graph"

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream(device)

    def eager(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``fn`` eagerly on a side stream, as CUDA's capture recipe warms up."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        return out

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record ``fn`` (nothing runs): -> (replay, the output tensor each replay rewrites)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph.replay, out


class EagerCapture:
    """The CPU stand-in for :class:`CudaCapture`: "replaying" calls the function again."""

    name = "eager_stand_in"

    def eager(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        out = torch.zeros(())
        return (lambda: out.copy_(fn())), out


_SEQUENCES = (
    ("audio", "audio_mask"),
    ("vision", "vision_mask"),
    ("text_tokens", "text_tokens_mask"),
)


@dataclass
class StaticInputs:
    """Flat buffers for every tensor field of a :class:`Batch`, viewed at a shape.

    Every graph reads its inputs from these buffers (the same addresses for every shape):
    :meth:`load` copies a batch into views of them. Sized for the largest batch the config
    allows (``batch_size`` clips, the length caps rounded up to the quantum)."""

    capacity: dict[str, int]  # field -> elements
    device: torch.device
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_config(cls, cfg: RunConfig, dims: dict[str, int], device: torch.device) -> StaticInputs:
        d, B = cfg.data, cfg.train.batch_size
        q = d.length_quantum or 1
        cap = {
            "audio": padded_length(d.max_audio_len, q),
            "vision": padded_length(d.max_vision_len, q),
            "text_tokens": padded_length(d.max_text_tokens, q),
        }
        capacity = {
            "text": B * dims["text"],
            "missing": B * 3,
            "target": B * len(d.emotions),
        }
        for seq, mask in _SEQUENCES:
            capacity[seq] = B * cap[seq] * dims["text" if seq == "text_tokens" else seq]
            capacity[mask] = B * cap[seq]
        return cls(capacity, device)

    def _view(self, name: str, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        if n > self.capacity[name]:
            raise ValueError(
                f"a batch's {name} {tuple(like.shape)} is larger than the static buffer "
                f"({self.capacity[name]} values): longer than the config's length caps"
            )
        buf = self.buffers.get(name)
        if buf is None:
            buf = torch.zeros(self.capacity[name], dtype=like.dtype, device=self.device)
            self.buffers[name] = buf
        elif (
            buf.dtype != like.dtype
        ):  # a new buffer would leave the captured graphs reading freed memory
            raise ValueError(f"a batch's {name} is {like.dtype}, its static buffer {buf.dtype}")
        return buf[:n].view(like.shape)

    def load(self, batch: Batch) -> Batch:
        """Copy ``batch`` into the buffers; -> the batch of views (the graph's inputs)."""
        views = {}
        for f in fields(Batch):
            x = getattr(batch, f.name)
            if isinstance(x, torch.Tensor):
                v = self._view(f.name, x)
                v.copy_(x, non_blocking=True)
                views[f.name] = v
            else:
                views[f.name] = x
        return Batch(**views)


def shape_key(batch: Batch) -> tuple:
    """What a graph is specific to: every tensor field's shape and dtype (None: absent)."""
    return tuple(
        None if not isinstance(x, torch.Tensor) else (tuple(x.shape), x.dtype)
        for x in (getattr(batch, f.name) for f in fields(Batch))
    )


@dataclass
class _Graph:
    replay: Callable[[], None]
    loss: torch.Tensor  # rewritten by every replay
    inputs: Batch  # the static views it reads


class GraphedStep:
    """The whole step captured per batch shape and replayed (see the module docstring).

    One process, one micro-batch per step, frozen-feature mode; the optimiser must be fused
    AdamW with ``capturable=True`` and tensor learning rates on the device
    (:func:`taemi.train.trainer.make_optimizer` with ``capturable=True``); :meth:`build`
    makes the rest of what it needs. ``scaler``: the run's grad scaler, enabled for fp16
    (its cycle is captured with the step, see the module docstring); None or disabled for
    bf16 and fp32."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: RunConfig,
        device: torch.device,
        precision: str,
        static: StaticInputs,
        capture: CudaCapture | EagerCapture,
        max_shapes: int,
        compile: bool = False,
        scaler: torch.amp.GradScaler | None = None,
    ):
        scaling = scaler is not None and scaler.is_enabled()
        if precision == "fp16" and not scaling:
            raise ValueError("a captured fp16 step needs the run's enabled grad scaler")
        if scaling and not getattr(optimizer, "_step_supports_amp_scaling", False):
            # any other optimiser makes GradScaler.step read found_inf on the host
            raise ValueError(
                "a captured step with loss scaling needs fused AdamW, which skips an "
                "overflowed update on the device"
            )
        # a disabled scaler passes everything through (bf16, fp32)
        self.scaler = scaler if scaling else torch.amp.GradScaler(device.type, enabled=False)
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.device, self.precision = device, precision
        self.static, self.capturer, self.max_shapes = static, capture, max_shapes
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()
        self.counts = {"replays": 0, "eager_steps": 0, "captures": 0, "over_limit_steps": 0}
        self.capture_seconds = 0.0
        self.failed: str | None = None  # why capturing was given up, if it was
        self.weights: PrecastWeights | None = None  # made on the first step
        self.compile = compile
        self._rates = [g["lr"] for g in optimizer.param_groups]  # the tensors graphs read
        if not all(isinstance(r, torch.Tensor) for r in self._rates):
            raise ValueError(
                "a captured step needs the learning rates as device tensors "
                "(learning_rates_on_device)"
            )

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: RunConfig,
        device: torch.device,
        precision: str,
        dims: dict[str, int],
        max_shapes: int,
        compile: bool = False,
        scaler: torch.amp.GradScaler | None = None,
    ) -> GraphedStep:
        """The captured step for ``model`` trained by ``optimizer`` (capturable, its schedule
        already made): learning rates moved to the device, static buffers for the config's
        largest batch of features of ``dims``, CUDA graphs on CUDA, else the eager stand-in."""
        learning_rates_on_device(optimizer, device)
        return cls(
            model,
            optimizer,
            cfg,
            device,
            precision,
            StaticInputs.for_config(cfg, dims, device),
            CudaCapture(device) if device.type == "cuda" else EagerCapture(),
            max_shapes,
            compile,
            scaler,
        )

    def _keep_rates(self) -> None:
        """The captured update reads the rate tensors it was captured with: a schedule that
        assigned a float instead of filling the tensor (older torch) is copied into it."""
        for g, rate in zip(self.optimizer.param_groups, self._rates):
            if g["lr"] is not rate:
                rate.fill_(float(g["lr"]))
                g["lr"] = rate

    def _body(self, batch: Batch) -> torch.Tensor:
        """The step on ``batch``: forward (with the weights cast once, in mixed precision),
        MSE, backward writing over the gradient tensors (the same tensors in every graph, no
        zeroing), clipping, AdamW; in fp16 with the loss scaled, the gradients unscaled and
        checked before clipping, the update skipped on an overflow and the scale updated, all
        on the device. -> the loss (detached, unscaled)."""
        with attention_backends(self.device), autocast(self.device, self.precision, cache=False):
            pred = self.weights.forward(batch)  # (B, E)
        loss = F.mse_loss(pred.float(), batch.target)
        self.weights.backward(self.scaler.scale(loss))
        scaled_update(self.model, self.optimizer, self.scaler, self.cfg)
        return loss.detach()

    def compute(self, group: list[Batch], n_group: float) -> torch.Tensor:
        if len(group) != 1:
            raise ValueError("a captured step takes one micro-batch (train.grad_accum_steps=1)")
        batch = group[0]
        self._keep_rates()
        if self.weights is None:  # found on the first (eager) step, before any capture
            self.weights = PrecastWeights.for_model(
                self.model,
                batch,
                self.device,
                self.precision,
                self.cfg.train.precast_weights,
                compile=self.compile,
            )
        key = shape_key(batch)
        graph = self.graphs.get(key)
        if graph is None and key in self.seen and self.failed is None:
            if len(self.graphs) < self.max_shapes:
                graph = self._capture(key, batch)
            else:
                self.counts["over_limit_steps"] += 1
        if graph is None:
            self.seen.add(key)
            self.counts["eager_steps"] += 1
            return self.capturer.eager(lambda: self._body(batch)).reshape(1)
        graph.inputs = self.static.load(batch)
        graph.replay()
        self.counts["replays"] += 1
        return graph.loss.reshape(1).clone()  # the next replay rewrites graph.loss

    def _capture(self, key: tuple, batch: Batch) -> _Graph | None:
        t0 = time.perf_counter()
        inputs = self.static.load(batch)
        try:
            replay, loss = self.capturer.capture(lambda: self._body(inputs))
        except Exception as exc:  # noqa: BLE001 - recorded, said, and the step runs eagerly
            self.failed = f"{type(exc).__name__}: {exc}"
            if self.scaler.is_enabled():  # a capture stopped mid-cycle: start anew
                _forget_scaler_cycle(self.scaler)
            log.warning(
                "capturing the training step in a CUDA graph failed (%s); the run goes on with "
                "eager steps (train.cuda_graphs=off avoids the attempt)",
                self.failed,
            )
            return None
        self.capture_seconds += time.perf_counter() - t0
        self.counts["captures"] += 1
        graph = _Graph(replay, loss, inputs)
        self.graphs[key] = graph
        return graph

    def update(self) -> None:
        """Nothing: the captured step clipped and stepped already (an eager step too)."""

    def stats(self) -> dict:
        return {
            "engine": "graphed",
            "capture": self.capturer.name,
            "shapes": len(self.graphs),
            "max_shapes": self.max_shapes,
            **self.counts,
            "capture_seconds": round(self.capture_seconds, 3),
            "failed": self.failed,
            "loss_scaling": self.scaler.is_enabled(),
            **(self.weights.stats() if self.weights else {}),
        }


def _forget_scaler_cycle(scaler: torch.amp.GradScaler) -> None:
    """Clear what ``scaler`` recorded of a step that did not finish (``unscale_`` called, no
    ``update``), which would make the next step's ``unscale_`` refuse to run. GradScaler has
    no public call for it: ``update`` clears the same record but also applies the half-made
    step's inf check to the scale."""
    scaler._per_optimizer_states.clear()  # a defaultdict: a fresh record on the next access


def learning_rates_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each parameter group's learning rate as a float32 tensor on ``device``, and the group
    capturable: what a captured AdamW update reads. Call after the schedule is built (its
    base rates stay Python floats, so filling the rate each step never waits for the
    device) and again after loading a saved optimiser state (which holds floats)."""
    for g in optimizer.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)
        g["capturable"] = True


def current_lr(scheduler) -> float:
    """The first group's learning rate now, as a float (a device tensor is read back: a
    host sync, so call it per epoch or on an error, not per step)."""
    return float(scheduler.get_last_lr()[0])
