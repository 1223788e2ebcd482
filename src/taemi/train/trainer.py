"""The training recipe of docs/method.md section 6, over a feature store: set-up, then the loop.

AdamW (lr 1e-4, weight decay 0.01); per-step linear warm-up (1 epoch) then cosine
decay to 0 over all ``max_epochs``; mixed precision (fp16 + grad scaling on CUDA,
optional bf16 autocast on CPU); gradient clipping by value (release) or norm; early
stopping on validation mean Pearson; best and last checkpoints; exact resume.

The recipe is built from components: the training mode (:mod:`taemi.train.modes`:
frozen features or end-to-end fine-tuning supplies the dataset, the model and its
parameter groups), the run folder (:mod:`taemi.run`: every file it writes), the
training state (:mod:`taemi.train.state`: ``state.pt`` and exact resume), the process
group (:mod:`taemi.train.distributed`), the schedule (:mod:`taemi.train.schedule`) and the
experiment trackers (:mod:`taemi.train.tracking`: TensorBoard, MLflow).

Training on everything (``valid_labels=None``, ``fixed_epochs=N``): the final model of
a challenge entry is trained on train + valid for the number of epochs a validated run
chose (its ``best_epoch``). There is no validation split, so there is no early stopping
and no selection: the run trains exactly ``N`` epochs of the usual schedule (warm-up,
then cosine over all ``train.max_epochs``, so epoch ``k`` has the learning rate it had in
the validated run) and ``best.safetensors`` is the last epoch's weights. ``history.csv``
then has no valid columns, ``metrics.json`` has ``"valid": null`` and
``"train_on_all": true``, and no plots are drawn (there is no validation curve).

Every run folder records the features it was trained on in ``features.json`` (the
store's dims, dtype, text-token flag and per-modality provenance: extraction profile,
models and options), so that predicting from media can extract features the same way.

Distributed data parallel (``torchrun --nproc-per-node N -m taemi train ...``; gloo on
CPU, NCCL on CUDA, one GPU per process): ``train.batch_size`` stays the GLOBAL batch.
Every rank builds the same global batches (from (seed, epoch), exactly those of a single
process) and takes its share of each; each rank's micro-batch loss is weighted by its share
of the step's clips, so the averaged gradient is that of the global batch's mean loss.
Every rank validates on the whole validation split (identical weights give identical
metrics and early-stopping decisions without communication); only rank 0 writes the run
folder (config, weights, state, history, metrics, plots). ``state.pt`` keeps every rank's
RNG state, so a resumed run with the same number of processes continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from taemi.config import ConfigError, RunConfig, save_config
from taemi.data.batch import Batch
from taemi.data.labels import Labels
from taemi.data.resident import ResidentFeatures, memory_available, resident_bytes
from taemi.data.sampler import padding_fraction
from taemi.eval.metrics import Metrics, compute_metrics
from taemi.eval.predict import check_finite_predictions, predict_dataset
from taemi.run import (
    CONFIG_FILE,
    STATE_FILE,
    RunFolderError,
    TrainingFolder,
    plot_path,
    read_metrics,
    save_weights,
    weights_file,
    write_features_record,
    write_history,
    write_metrics,
    write_valid_predictions,
)
from taemi.runtime import resolve_device, resolve_precision, seed_everything
from taemi.store import FeatureStore
from taemi.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    gather_rng_states,
    init_distributed,
)
from taemi.train.modes import FrozenMode, check_store_fits, mode_for
from taemi.train.plots import plot_history, plot_per_emotion
from taemi.train.schedule import make_scheduler
from taemi.train.state import Progress, check_resumable, resume_state, save_state
from taemi.train.step import EagerStep, GraphedStep, current_lr
from taemi.train.tracking import make_trackers

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or weights); the message says where and why."""


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int  # the last epoch when trained without validation
    best: Metrics | None  # None when trained without validation
    history: list[dict]
    stopped_early: bool


# --------------------------------------------------------------------------- set-up


def make_optimizer(
    cfg: RunConfig, model: torch.nn.Module, *, capturable: bool = False
) -> torch.optim.Optimizer:
    """AdamW over the mode's parameter groups (fine-tuning: fusion at ``train.lr``,
    backbones at ``finetune.backbone_lr``; frozen parameters left out).

    ``capturable``: the form a step captured in a CUDA graph needs (:mod:`taemi.train.step`):
    fused, step counts on the device; the learning rates become device tensors once the
    schedule exists (:func:`taemi.train.step.learning_rates_on_device`)."""
    tc = cfg.train
    fused = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
    if capturable:
        fused["capturable"] = True
    groups = mode_for(cfg).param_groups(
        cfg, model
    )  # fused: one kernel over all parameters (1.05x per CPU step)
    return torch.optim.AdamW(
        groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas, **fused
    )


def _check_epochs(
    cfg: RunConfig, valid_labels: Labels | None, fixed_epochs: int | None
) -> RunConfig:
    """Validated runs select on the validation split; training on all runs ``fixed_epochs``."""
    if valid_labels is None:
        if fixed_epochs is None:
            raise ValueError(
                "training without validation labels needs fixed_epochs (how many epochs to run)"
            )
        if not 1 <= fixed_epochs <= cfg.train.max_epochs:
            raise ConfigError(
                f"fixed_epochs={fixed_epochs} must be between 1 and train.max_epochs={cfg.train.max_epochs} "
                "(the length of the learning-rate schedule); raise train.max_epochs"
            )
        if cfg.train.patience:
            log.info(
                "no validation split: early stopping is off (train.patience %d -> 0)",
                cfg.train.patience,
            )
            cfg = replace(cfg, train=replace(cfg.train, patience=0))
    elif fixed_epochs is not None:
        raise ValueError(
            "fixed_epochs is for training without validation (valid_labels=None); with a validation "
            "split use train.max_epochs (and train.patience=0 to turn early stopping off)"
        )
    return cfg


def _setup_devices(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group (torchrun) and pick this process's device (one GPU each)."""
    dist_info = init_distributed(device_name)
    device = resolve_device(device_name)
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    return dist_info, device


def epoch_batches(
    cfg: RunConfig,
    dataset,
    store: FeatureStore,
    epoch: int,
    dist_info: DistInfo,
    lengths: np.ndarray | None = None,
) -> list[list[int]]:
    """This rank's batches (dataset indices) of ``epoch``; they depend on (seed, epoch) only.

    ``data.batching=random``: the shuffled order of a ``RandomSampler`` seeded by (seed,
    epoch), cut into global batches of ``train.batch_size``. ``bucket``: length-bucketed
    global batches (:class:`taemi.data.sampler.LengthBucketBatchSampler`) by ``lengths``
    (``dataset.lengths()``, read from the store index when not given; fine-tuning's
    datasets: the stored features' lengths). With N ranks,
    rank r takes its share of every global batch (a last global batch smaller than N is
    completed with its own first clips, as DistributedSampler pads).
    """
    tc = cfg.train
    n = len(dataset)
    if cfg.data.batching == "bucket":
        from taemi.data.sampler import LengthBucketBatchSampler, dataset_lengths

        if lengths is None and hasattr(dataset, "lengths"):  # a ClipDataset of stored features
            lengths = dataset.lengths()
        elif lengths is None:  # fine-tuning: the stored features' lengths stand for the clips'
            lengths = dataset_lengths(
                store,
                dataset.ids,
                cfg.data.max_audio_len,
                cfg.data.max_vision_len,
                modalities=cfg.data.modalities,
            )
        sampler = LengthBucketBatchSampler(
            lengths,
            tc.batch_size,
            seed=tc.seed,
            epoch=epoch,
            num_replicas=dist_info.world,
            rank=dist_info.rank,
        )
        return [list(map(int, b)) for b in sampler]
    gen = torch.Generator().manual_seed(
        tc.seed * 100_003 + epoch
    )  # shuffle depends on (seed, epoch) only
    order = torch.randperm(
        n, generator=gen
    ).tolist()  # the order RandomSampler(generator=gen) yields
    out = []
    for start in range(0, n, tc.batch_size):
        glob = order[start : start + tc.batch_size]
        if dist_info.world > 1:
            while len(glob) < dist_info.world:
                glob = glob + glob[: dist_info.world - len(glob)]
            glob = np.array_split(np.asarray(glob), dist_info.world)[dist_info.rank].tolist()
        out.append(glob)
    return out


def _micro_batch_groups(loader: Iterable, size: int) -> Iterable[list]:
    """Consecutive micro-batches of one optimiser step (the last group may be shorter)."""
    group: list = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _open_run_folder(run: Path, dist_info: DistInfo, device: torch.device) -> TrainingFolder | None:
    """Rank 0 creates and locks the run folder; every rank learns whether that worked, so
    that a refused lock stops all of them instead of leaving the others waiting."""
    folder, error = None, None
    if dist_info.main:
        try:
            folder = TrainingFolder(run).open()
        except RunFolderError as e:
            error = e
    if dist_info.world > 1:
        failed = all_reduce_sum(torch.tensor(float(error is not None), device=device), dist_info)
        if float(failed) and error is None:
            raise RunFolderError(f"rank 0 could not open the run folder {run} (see its error)")
    if error is not None:
        raise error
    return folder


def _start_run_folder(
    run: Path,
    cfg: RunConfig,
    mode: FrozenMode,
    model: torch.nn.Module,
    store: FeatureStore,
    resume: bool,
    dist_info: DistInfo,
) -> None:
    """Check that the folder may take this run (``--resume``: that it holds this run), then
    rank 0 writes the resolved config, ``features.json`` and what the mode needs to
    rebuild the model."""
    features = mode.features(store, model)
    if resume:
        check_resumable(run, cfg, features, store)
    elif (run / CONFIG_FILE).exists():
        raise FileExistsError(
            f"{run} already holds a run; use --resume to continue it or choose another --out"
        )
    barrier(dist_info)  # every rank has checked the folder before rank 0 writes to it
    if dist_info.main:
        save_config(cfg, run / CONFIG_FILE)
        write_features_record(run, features)
        mode.save_architecture(model, run)


def _setup_schedule(cfg: RunConfig, optimizer: torch.optim.Optimizer, train_clips: int):
    """Warm-up then cosine over all ``train.max_epochs``, stepped once per optimiser step."""
    tc = cfg.train
    steps_per_epoch = math.ceil(math.ceil(train_clips / tc.batch_size) / tc.grad_accum_steps)
    warmup = max(1, round(tc.warmup_epochs * steps_per_epoch)) if tc.warmup_epochs > 0 else 0
    return make_scheduler(optimizer, warmup, tc.max_epochs * steps_per_epoch)


def _wrap_model(
    model: torch.nn.Module,
    cfg: RunConfig,
    mode: FrozenMode,
    dist_info: DistInfo,
    device: torch.device,
    fresh: bool,
    graphs: bool = False,
) -> torch.nn.Module:
    """The module the eager steps run: DDP over ``model`` (several processes), compiled when
    ``train.compile`` (captured steps compile their own forward instead); the weights stay in
    ``model`` (saving, validation)."""
    train_model = model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if fresh:
            torch.manual_seed(
                cfg.train.seed + 1_000_003 * dist_info.rank
            )  # ranks draw different dropout masks
        train_model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=mode.find_unused_parameters,
        )
    if cfg.train.compile and not graphs:  # the compiled module shares the weights of `model`
        train_model = torch.compile(train_model, dynamic=True)
    return train_model


#: ``data.length_quantum=0`` (auto) on CUDA: ~60 batch shapes over the corpus's length mix
#: with bucketed batches, ~11% padding (5.5% unquantised); see :mod:`taemi.train.step`.
CUDA_LENGTH_QUANTUM = 32


def _resolve_length_quantum(cfg: RunConfig, device: torch.device) -> RunConfig:
    """``data.length_quantum=0`` -> 32 on CUDA (a finite set of batch shapes: kernel plans and
    captured graphs are reused), 1 elsewhere (on a CPU padding only costs time). The run's
    config.yaml records the resolved value."""
    if cfg.data.length_quantum:
        return cfg
    q = CUDA_LENGTH_QUANTUM if device.type == "cuda" else 1
    return replace(cfg, data=replace(cfg.data, length_quantum=q))


def _use_graphs(
    cfg: RunConfig, mode: FrozenMode, device: torch.device, dist_info: DistInfo
) -> bool:
    """Whether the steps are captured (:class:`GraphedStep`), by ``train.cuda_graphs``.

    ``auto``: on CUDA when the run can be captured; ``on``: a run that cannot be captured is
    refused (on a CPU the captured-step path runs with its eager stand-in, as the tests do);
    ``off``: never."""
    tc = cfg.train
    if tc.cuda_graphs == "off":
        return False
    why_not = []
    if not mode.stored_features:
        why_not.append("fine-tuning (the backbones' input shapes are not bounded)")
    if dist_info.world > 1:
        why_not.append("several processes (DDP)")
    if tc.grad_accum_steps > 1:
        why_not.append("gradient accumulation")
    if tc.cuda_graphs == "auto":
        return device.type == "cuda" and not why_not
    if why_not:
        raise ConfigError(f"train.cuda_graphs=on cannot capture this run: {'; '.join(why_not)}")
    if device.type != "cuda":
        log.info(
            "train.cuda_graphs=on on %s: there are no CUDA graphs here, the captured-step path "
            "runs with its eager stand-in",
            device,
        )
    return True


def _use_resident(cfg: RunConfig, mode: FrozenMode, device: torch.device, datasets: list) -> bool:
    """Whether the splits' features are held on the device (``data.resident``): ``auto`` on
    CUDA when they take at most ``data.resident_share`` of its free memory, ``yes`` always
    (refused when they do not fit), ``no`` never."""
    d = cfg.data
    if d.resident == "no" or (d.resident == "auto" and device.type != "cuda"):
        return False
    if not mode.stored_features:
        if d.resident == "yes":
            raise ConfigError(
                "data.resident=yes: fine-tuning reads raw waveforms, not stored features"
            )
        return False
    need = sum(resident_bytes(ds) for ds in datasets if ds is not None)
    free = memory_available(device)
    if need <= d.resident_share * free:
        return True
    what = (
        f"the splits' features take {need / 2**30:.2f} GiB, more than data.resident_share="
        f"{d.resident_share:g} of the {free / 2**30:.2f} GiB free on {device}"
    )
    if d.resident == "yes":
        raise ConfigError(f"data.resident=yes: {what}")
    log.info("%s: batches come from pinned host memory instead", what)
    return False


def _execution(
    cfg: RunConfig,
    mode: FrozenMode,
    model: torch.nn.Module,
    train_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    store: FeatureStore,
    device: torch.device,
    precision: str,
    graphs: bool,
    dist_info: DistInfo,
    train_ds,
    valid_ds,
    resident: bool,
    show: bool,
) -> Execution:
    """The step engine and the batch source of the run (set up after any resume, so that a
    captured step reads the restored learning rates)."""
    if graphs:
        engine: EagerStep | GraphedStep = GraphedStep.build(
            model,
            optimizer,
            cfg,
            device,
            precision,
            store.dims,
            cfg.train.graph_shapes,
            compile=cfg.train.compile,  # the captured forward compiled, not train_model
            scaler=scaler,  # fp16: its cycle is captured with the step
        )
    else:
        engine = EagerStep(
            model,
            train_model,
            optimizer,
            scaler,
            cfg,
            device,
            precision,
            dist_info.world,
            # fine-tuning keeps autocast's casts: a backbone's gradient checkpointing
            # recomputes its forward with the module's own parameters
            precast=cfg.train.precast_weights and mode.stored_features,
        )
    lengths = train_ds.lengths() if mode.stored_features else None
    ex = Execution(engine, device, precision, cfg.data.length_quantum, lengths=lengths)
    if resident:
        ex.resident_train = ResidentFeatures(train_ds, device, progress=show)
        if valid_ds is not None:
            ex.resident_valid = ResidentFeatures(valid_ds, device, progress=show)
    return ex


def _warn_on_overlap(train_labels: Labels, valid_labels: Labels) -> None:
    """Validating on training clips makes early stopping and best-epoch selection favour
    memorisation; it is allowed (a smoke test) but said."""
    same = train_labels.source == valid_labels.source
    with contextlib.suppress(OSError):
        same = same or os.path.samefile(train_labels.source, valid_labels.source)
    if same:
        log.warning(
            "the validation labels %s are the training labels: the validation score measures fit, not "
            "generalisation, and early stopping and best-epoch selection favour memorisation",
            valid_labels.source,
        )
        return
    both = sorted(set(train_labels.ids) & set(valid_labels.ids))
    if both:
        log.warning(
            "%d of the %d validation clips of %s are also training clips of %s (e.g. %s): the validation "
            "score overstates generalisation",
            len(both),
            len(valid_labels),
            valid_labels.source,
            train_labels.source,
            ", ".join(both[:5]),
        )


def _nonfinite_inputs(batch) -> list[str]:
    """Ids of the batch's clips whose input features hold NaN/Inf (any float tensor field
    with one row per clip; the target is checked when labels are read)."""
    import dataclasses

    bad = torch.zeros(len(batch), dtype=torch.bool)
    for f in dataclasses.fields(batch):
        x = getattr(batch, f.name)
        if (
            f.name != "target"
            and isinstance(x, torch.Tensor)
            and x.is_floating_point()
            and x.ndim >= 1
            and x.shape[0] == len(batch)
        ):
            bad |= ~torch.isfinite(x.reshape(len(batch), -1)).all(dim=1).cpu()
    return [batch.ids[i] for i in torch.nonzero(bad).flatten().tolist()] if batch.ids else []


#: Optimiser steps between two checks of the training loss on an accelerator: each check
#: waits for the device (a host sync), which a launch-bound step cannot afford every time.
#: On the CPU there is nothing to wait for, so every step is checked as it ends.
ACCELERATOR_LOSS_CHECK_STEPS = 10


def _check_step_losses(
    pending: list[tuple[int, torch.Tensor, list, float]],
    dist_info: DistInfo,
    *,
    epoch: int,
    steps: int,
    cfg: RunConfig,
    store: FeatureStore,
) -> None:
    """Stop at the first optimiser step of ``pending`` ((step, losses of its micro-batches,
    its micro-batches, learning rate) each) whose loss, on any rank, is NaN/Inf, naming the
    step and the likely cause: features holding NaN/Inf, or a diverging optimisation.

    One host sync (and under DDP one small all-reduce) per call, so every rank stops at the
    same step."""
    flags = torch.stack(
        [(~torch.isfinite(losses)).any() for _, losses, _, _ in pending]
    ).float()  # (k,)
    if dist_info.world > 1:
        flags = all_reduce_sum(flags, dist_info)
    flags = flags.cpu()  # the sync: the price of stopping within a few steps
    if not bool(flags.any()):
        return
    step, losses, group, lr = pending[int(torch.nonzero(flags).flatten()[0])]
    where = f"training stopped at epoch {epoch}, step {step} of {steps}"
    if bool(torch.isfinite(losses).all()):  # DDP: another rank saw it and reports the cause
        raise TrainingError(
            f"{where}: the training loss of another process is NaN/Inf (see its error)"
        )
    where += f": the training loss is {', '.join(f'{v:g}' for v in losses.tolist())}"
    ids = [i for b in group for i in _nonfinite_inputs(b)]
    if ids:
        raise TrainingError(
            f"{where}; the features of clip(s) {', '.join(ids[:5])} hold NaN/Inf values (check the store: "
            f"taemi store verify {store.root})"
        )
    raise TrainingError(
        f"{where} with finite inputs (learning rate {lr:.3g} at this step): the optimisation diverged; "
        f"lower train.lr (now {cfg.train.lr:g}) or clip gradients harder (train.grad_clip={cfg.train.grad_clip:g})"
    )


def _check_weights(model: torch.nn.Module, epoch: int, cfg: RunConfig) -> None:
    """Refuse to validate or save non-finite weights (the epoch's last step may have made them so)."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise TrainingError(
            f"training stopped after epoch {epoch}: the weights became NaN/Inf ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}); the optimisation diverged: lower train.lr (now {cfg.train.lr:g})"
        )


# --------------------------------------------------------------------------- the loop


@dataclass
class Execution:
    """How this process runs the recipe: the step engine, where batches are built, and what
    was measured about it (``metrics.json``'s ``execution`` record)."""

    engine: EagerStep | GraphedStep
    device: torch.device
    precision: str
    length_quantum: int
    resident_train: ResidentFeatures | None = None
    resident_valid: ResidentFeatures | None = None
    lengths: np.ndarray | None = None  # (N, K) trimmed lengths of the training clips
    padding: list[float] = field(default_factory=list)  # per epoch, share of padded positions
    startup_seconds: float | None = None

    def record(self) -> dict:
        resident = [r for r in (self.resident_train, self.resident_valid) if r is not None]
        return {
            "precision": self.precision,
            "attention": "flash|efficient|math (no cuDNN)"
            if self.device.type == "cuda"
            else "default",
            "step": self.engine.stats(),
            "length_quantum": self.length_quantum,
            "padding_share": None if not self.padding else round(self.padding[-1], 4),  # last epoch
            "batches": "resident on the device" if resident else "DataLoader",
            "resident_bytes": sum(r.nbytes for r in resident) if resident else None,
            "resident_load_seconds": round(sum(r.load_seconds for r in resident), 3)
            if resident
            else None,
            "startup_seconds": None
            if self.startup_seconds is None
            else round(self.startup_seconds, 3),
        }


def _device_batches(loader: Iterable[Batch], device: torch.device) -> Iterable[Batch]:
    """The loader's batches on ``device``, one batch ahead: the next batch's (pinned,
    non-blocking) copy is queued before the current one is used, so on a GPU it overlaps
    the step."""
    ahead = None
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        if ahead is not None:
            yield ahead
        ahead = batch
    if ahead is not None:
        yield ahead


def _in_order(res: ResidentFeatures, batch_size: int) -> Iterable[Batch]:
    """The resident split's clips in dataset order, ``batch_size`` at a time (validation)."""
    for start in range(0, len(res), batch_size):
        yield res.batch(np.arange(start, min(start + batch_size, len(res))))


def _train_epoch(
    cfg: RunConfig,
    model: torch.nn.Module,
    train_ds,
    store: FeatureStore,
    epoch: int,
    last_epoch: int,
    dist_info: DistInfo,
    ex: Execution,
    scheduler,
    show: bool,
) -> tuple[float, int]:
    """One epoch of optimiser steps; (sum of the clips' losses, clips seen) over every rank."""
    tc, accum, device = cfg.train, cfg.train.grad_accum_steps, ex.device
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(epoch)  # augmentation draws depend on (seed, epoch, clip)
    batches = epoch_batches(cfg, train_ds, store, epoch, dist_info, ex.lengths)
    if ex.lengths is not None:
        ex.padding.append(padding_fraction(batches, ex.lengths, ex.length_quantum))
    steps_this_epoch = math.ceil(len(batches) / accum)
    if ex.resident_train is not None:
        source: Iterable[Batch] = (ex.resident_train.batch(b) for b in batches)
    else:
        loader = DataLoader(
            train_ds,
            batch_sampler=batches,
            num_workers=cfg.data.num_workers,
            collate_fn=train_ds.collator(),
            pin_memory=device.type == "cuda",
        )
        source = _device_batches(loader, device)
    model.train()
    loss_sum, n_seen = torch.zeros((), device=device), 0
    check_every = 1 if device.type == "cpu" else ACCELERATOR_LOSS_CHECK_STEPS
    pending_checks: list[tuple[int, torch.Tensor, list, float]] = []
    bar = tqdm(
        total=steps_this_epoch,
        desc=f"epoch {epoch}/{last_epoch}",
        disable=not show,
        leave=False,
        unit="step",
    )
    for step, group in enumerate(_micro_batch_groups(source, accum), 1):
        # one optimiser step over the group's micro-batches (of all ranks); each micro-batch's
        # mean loss is weighted by its share of the step's clips, so the step's loss is their mean
        n_group = sum(len(b) for b in group)
        if dist_info.world > 1:  # DDP averages gradients over ranks: weight by world / global count
            n_group = (
                int(all_reduce_sum(torch.tensor(n_group, device=device), dist_info))
                / dist_info.world
            )
        losses = ex.engine.compute(group, n_group)  # (len(group),) on the device
        for loss, batch in zip(losses, group):
            loss_sum += loss * len(batch)  # stays on the device
            n_seen += len(batch)
        pending_checks.append((step, losses, group, scheduler.get_last_lr()[0]))
        if len(pending_checks) >= check_every or step == steps_this_epoch:
            _check_step_losses(
                pending_checks, dist_info, epoch=epoch, steps=steps_this_epoch, cfg=cfg, store=store
            )
            pending_checks = []
        bar.update(1)
        ex.engine.update()  # clip + AdamW, unless the captured step did them
        scheduler.step()
        if show and (step % 10 == 0 or step == steps_this_epoch):
            bar.set_postfix(
                loss=f"{loss_sum.item() / n_seen:.4f}", lr=f"{current_lr(scheduler):.2e}"
            )
        if dist_info.main and tc.log_every and step % tc.log_every == 0:
            log.info("epoch %d step %d: train loss %.5f", epoch, step, loss_sum.item() / n_seen)
    bar.close()
    if dist_info.world > 1:  # the epoch's train loss over every rank's clips
        totals = all_reduce_sum(
            torch.stack([loss_sum.float(), torch.tensor(float(n_seen), device=device)]), dist_info
        )
        loss_sum, n_seen = totals[0], int(totals[1])
    return float(loss_sum), n_seen


def train(
    cfg: RunConfig,
    store: FeatureStore | str | os.PathLike,
    train_labels: Labels,
    valid_labels: Labels | None,
    out_dir: str | os.PathLike,
    *,
    fixed_epochs: int | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Iterable[EpochCallback] = (),
) -> TrainResult:
    """Train ``cfg`` on ``train_labels``' clips, select on ``valid_labels``; write ``out_dir``.

    With ``valid_labels=None`` the run trains exactly ``fixed_epochs`` epochs with no
    validation (see the module docstring); ``fixed_epochs`` is only for that case.
    """
    # set-up: everything that can be refused is checked before the run folder is touched
    cfg = _check_epochs(cfg, valid_labels, fixed_epochs)
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    mode = mode_for(cfg.validate())
    cfg = mode.resolve_text_tokens(cfg, store)
    check_store_fits(cfg, store)
    t_start = time.perf_counter()
    dist_info, device = _setup_devices(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    cfg = _resolve_length_quantum(cfg, device)
    tc = cfg.train
    graphs = _use_graphs(cfg, mode, device, dist_info)
    trackers = make_trackers(cfg, main=dist_info.main)  # a missing package is refused here
    if valid_labels is not None:
        valid_labels.check_scorable("validation")
        _warn_on_overlap(train_labels, valid_labels)
    train_ds = mode.dataset(cfg, store, train_labels, training=True)
    valid_ds = None if valid_labels is None else mode.dataset(cfg, store, valid_labels)
    resident = _use_resident(cfg, mode, device, [train_ds, valid_ds])
    last_epoch = tc.max_epochs if fixed_epochs is None else fixed_epochs
    run = Path(out_dir)
    state_path = run / STATE_FILE
    main = dist_info.main
    folder = _open_run_folder(
        run, dist_info, device
    )  # rank 0: created if needed, locked until we return
    saved_epoch = False  # whether this process has written a finished epoch to the run folder
    discard = False
    try:
        seed_everything(tc.seed, tc.deterministic)
        cfg, model = mode.build(cfg)  # fine-tuning: loads the backbones, sets their sizes
        _start_run_folder(run, cfg, mode, model, store, resume, dist_info)
        model = model.to(device)
        optimizer = make_optimizer(cfg, model, capturable=graphs)
        scheduler = _setup_schedule(cfg, optimizer, len(train_ds))
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        state = Progress()
        if resume:
            state = resume_state(
                state_path, model, optimizer, scheduler, scaler, device, dist_info, fixed_epochs
            )
        trackers.start(run, cfg, first_epoch=state.start_epoch)  # rank 0 only
        train_model = _wrap_model(
            model,
            cfg,
            mode,
            dist_info,
            device,
            fresh=not resume or not state_path.is_file(),
            graphs=graphs,
        )
        ex = _execution(
            cfg,
            mode,
            model,
            train_model,
            optimizer,
            scaler,
            store,
            device,
            precision,
            graphs,
            dist_info,
            train_ds,
            valid_ds if resident else None,
            resident,
            progress and main,
        )
        how = {  # what metrics.json says of the run besides its scores
            "fixed_epochs": fixed_epochs,
            "train_clips": len(train_ds),
            "device": str(device),
            "precision": precision,
            "world_size": dist_info.world,
        }
        stopped_early = bool(state.history) and tc.patience > 0 and state.bad_epochs >= tc.patience
        log.info(
            "training %s%s (%d parameters, %d trainable) on %d clips, %s; %s, %s",
            cfg.preset,
            mode.description,
            sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            len(train_ds),
            f"validating on {len(valid_ds)}"
            if valid_ds is not None
            else f"no validation: exactly {fixed_epochs} epochs",
            device,
            precision,
        )
        log.info(
            "steps: %s; batches: %s; sequences padded to a multiple of %d",
            "captured in CUDA graphs per batch shape"
            if isinstance(ex.engine, GraphedStep)
            else "eager",
            "resident on the device" if resident else "DataLoader",
            ex.length_quantum,
        )
        ex.startup_seconds = time.perf_counter() - t_start

        for epoch in range(state.start_epoch, last_epoch + 1):
            if stopped_early:
                break
            t0 = time.perf_counter()
            loss_sum, n_seen = _train_epoch(
                cfg,
                model,
                train_ds,
                store,
                epoch,
                last_epoch,
                dist_info,
                ex,
                scheduler,
                show=progress and main,
            )
            _check_weights(model, epoch, cfg)  # the epoch's last step may have made them non-finite

            if valid_ds is None:  # train on all: no validation, the last epoch is the model
                row = {
                    "epoch": epoch,
                    "train_loss": loss_sum / max(n_seen, 1),
                    "lr": current_lr(scheduler),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                state.history.append(row)
                state.best_epoch = epoch
                if main:
                    save_weights(model, weights_file(run, "best"))
                log.info("epoch %d/%d: train loss %.4f", epoch, last_epoch, row["train_loss"])
            else:
                pred, valid_loss = predict_dataset(
                    model,
                    valid_ds,
                    batch_size=tc.eval_batch_size,
                    device=device,
                    precision=precision,
                    num_workers=cfg.data.num_workers,
                    progress=progress and main,
                    desc="validate",
                    batches=None
                    if ex.resident_valid is None
                    else _in_order(ex.resident_valid, tc.eval_batch_size),
                )
                check_finite_predictions(
                    pred,
                    valid_ds.ids,
                    f"validation after epoch {epoch}",
                    cause=f"the weights are finite, so the features of these clips in {store.root} hold NaN/Inf "
                    f"(`taemi store verify {store.root}`)",
                )
                metrics = compute_metrics(pred, valid_ds.targets, cfg.data.emotions)
                row = {
                    "epoch": epoch,
                    "train_loss": loss_sum / max(n_seen, 1),
                    "lr": current_lr(scheduler),
                    "valid_loss": valid_loss,
                    "valid_mean_pearson": metrics.mean_pearson,
                    **{f"pearson_{e}": metrics.pearson[e] for e in cfg.data.emotions},
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                state.history.append(row)
                improved = metrics.mean_pearson > state.best_score
                if improved:
                    state.best_score, state.best_epoch, state.bad_epochs = (
                        metrics.mean_pearson,
                        epoch,
                        0,
                    )
                    state.best_metrics = metrics
                    if main:
                        save_weights(model, weights_file(run, "best"))
                        write_valid_predictions(run, valid_ds.ids, cfg.data.emotions, pred)
                else:
                    state.bad_epochs += 1
                log.info(
                    "epoch %d: train loss %.4f, valid loss %.4f, valid mean Pearson %.4f%s",
                    epoch,
                    row["train_loss"],
                    valid_loss,
                    metrics.mean_pearson,
                    " (best)" if improved else "",
                )
            stopped_early = tc.patience > 0 and state.bad_epochs >= tc.patience
            rng_ranks = gather_rng_states(dist_info)
            if main:
                save_weights(model, weights_file(run, "last"))
                save_state(
                    state_path,
                    model,
                    optimizer,
                    scheduler,
                    scaler,
                    device,
                    epoch=epoch,
                    history=state.history,
                    best_score=state.best_score,
                    best_epoch=state.best_epoch,
                    bad_epochs=state.bad_epochs,
                    best_metrics=state.best_metrics,
                    fixed_epochs=fixed_epochs,
                    rng_ranks=rng_ranks,
                    world_size=dist_info.world,
                )
                write_history(run, state.history)
                write_metrics(
                    run,
                    state.best_epoch,
                    state.best_metrics,
                    state.history,
                    stopped_early,
                    finished=False,
                    execution=ex.record(),
                    **how,
                )
                saved_epoch = True
            barrier(dist_info)  # the epoch is on disk before any rank moves on (or is interrupted)
            trackers.epoch(epoch, row)  # after state.pt: a resumed run logs no epoch twice
            for cb in callbacks:
                cb(epoch, row)
            if stopped_early:
                log.info(
                    "early stopping: no improvement for %d epochs; best epoch %d",
                    tc.patience,
                    state.best_epoch,
                )

        if main:
            # plots first: a run stopped while plotting is not marked finished, so a rerun
            # (or a CV / ablation grid reusing finished runs) completes it
            if valid_ds is not None:
                assert state.best_metrics is not None
                plot_history(state.history, plot_path(run, "learning_curves.png"))
                plot_per_emotion(
                    state.best_metrics.pearson,
                    plot_path(run, "per_emotion_pearson.png"),
                    title=f"valid Pearson per emotion (best epoch {state.best_epoch})",
                )
            write_metrics(
                run,
                state.best_epoch,
                state.best_metrics,
                state.history,
                stopped_early,
                finished=True,
                execution=ex.record(),
                **how,
            )
            trackers.end(read_metrics(run) or {})
        barrier(dist_info)
    except Exception:
        discard = not saved_epoch  # a failed start leaves no stub that would block a plain rerun
        raise
    finally:
        trackers.close()  # before a failed start's stub is removed
        if folder is not None:
            folder.close(discard=discard)
    return TrainResult(run, state.best_epoch, state.best_metrics, state.history, stopped_early)
