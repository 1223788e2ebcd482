"""The training recipe of spec section 6, over a feature store.

AdamW (lr 1e-4, weight decay 0.01); per-step linear warm-up (1 epoch) then cosine
decay to 0 over all ``max_epochs``; mixed precision (fp16 + grad scaling on CUDA,
optional bf16 autocast on CPU); gradient clipping by value (release) or norm; early
stopping on validation mean Pearson; best and last checkpoints; exact resume.

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

Resume is exact at epoch granularity: everything that decides the next epoch (model,
optimiser, scheduler, grad scaler, RNG states, early-stopping state, history) is
saved atomically in ``state.pt`` after every epoch, and the shuffling order of epoch
``e`` depends only on (seed, e). An interrupted epoch is redone from its start.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from taemi.config import ConfigError, RunConfig, load_config, save_config
from taemi.data.dataset import ClipDataset
from taemi.data.labels import Labels
from taemi.data.store import FeatureStore
from taemi.eval.metrics import Metrics, compute_metrics
from taemi.eval.predict import check_finite_predictions, predict_dataset
from taemi.model.checkpoint import (
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    RunFolderError,
    RunFolderLock,
    build_model,
    save_weights,
)
from taemi.train.plots import plot_history, plot_per_emotion
from taemi.train.runtime import autocast, resolve_device, resolve_precision, seed_everything
from taemi.train.schedule import make_scheduler

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
#: The run's record of its input features (see :func:`features_record`).
FEATURES_FILE = "features.json"
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


def features_record(store: FeatureStore) -> dict:
    """What a run remembers of its input features: the store's dims, dtype, whether it
    holds text token states, and the manifest's per-modality provenance (backbone and
    settings, incl. the extraction ``profile`` and options such as ``max_frames``)."""
    return {
        "store": str(store.root),
        "clips": len(store),
        "dims": dict(store.dims),
        "dtype": store.manifest["dtype"],
        "text_tokens": store.has_text_tokens,
        "modalities": store.manifest.get("modalities", {}),
    }


#: Keys of features.json that must agree when a run is resumed (the store may move or grow).
_FEATURE_KEYS = ("dims", "dtype", "text_tokens", "modalities")


def load_features_record(run_dir: str | os.PathLike) -> dict | None:
    """``RUN/features.json``, or None for a run folder without one (an imported release,
    or a run trained before runs recorded their features)."""
    path = Path(run_dir) / FEATURES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("dims"), dict):
        raise RunFolderError(f"{path} is not a features record (a JSON object with the store's dims)")
    return data


def check_store_fits(cfg: RunConfig, store: FeatureStore, run: str | os.PathLike | None = None) -> None:
    """The model's input sizes must equal the store's feature sizes (no silent reshaping).
    In fine-tuning only vision comes from the store (audio and text from the backbones).

    ``run``: the trained run folder the config comes from (evaluate, predict): its sizes
    are fixed, so the message asks for a store of the run's features instead of a
    ``--set`` that would only fit a new training run."""
    want = {"audio": cfg.model.audio_dim, "vision": cfg.model.vision_dim, "text": cfg.model.text_dim}
    if cfg.mode == "finetune":
        want = {"vision": cfg.model.vision_dim}
    for m, d in want.items():
        if store.dims[m] == d:
            continue
        if run is not None:
            raise ConfigError(
                f"the run {run} was trained on {m} features of size {d} ({Path(run) / CONFIG_FILE}: "
                f"model.{m}_dim) but the feature store {store.root} has size {store.dims[m]}; use a store "
                f"extracted as the run's features were ({Path(run) / FEATURES_FILE})"
            )
        raise ConfigError(
            f"the feature store {store.root} has {m} features of size {store.dims[m]} but "
            f"model.{m}_dim={d}; pass --set model.{m}_dim={store.dims[m]}"
        )


def resolve_text_tokens(cfg: RunConfig, store: FeatureStore) -> RunConfig:
    """Turn ``data.text_tokens=auto`` into yes/no: token states are used when the store has
    them and text is a key/value modality (non-text anchor)."""
    mode = cfg.data.text_tokens
    if cfg.mode == "finetune":  # the text backbone gives one vector per clip
        return replace(cfg, data=replace(cfg.data, text_tokens="no"))
    if mode == "auto":
        mode = "yes" if store.has_text_tokens and cfg.model.anchor != "text" else "no"
    if mode == "yes" and not store.has_text_tokens:
        raise ConfigError(f"data.text_tokens=yes but the store {store.root} has no text token states")
    return replace(cfg, data=replace(cfg.data, text_tokens=mode))


def make_dataset(cfg: RunConfig, store: FeatureStore, labels: Labels | None, ids=None, *, training: bool = False):
    """The clips of ``labels`` (or ``ids``) for ``cfg``'s mode: a :class:`ClipDataset` of
    stored features, or for ``mode=finetune`` a :class:`~taemi.finetune.data.FinetuneDataset`
    of raw audio, transcripts and stored vision (augmented when ``training``)."""
    if labels is not None and tuple(labels.emotions) != tuple(cfg.data.emotions):
        raise ConfigError(
            f"labels {labels.source} have emotions {list(labels.emotions)} but the config expects "
            f"{list(cfg.data.emotions)} (data.emotions)"
        )
    if cfg.mode == "finetune":
        from taemi.finetune.data import FinetuneDataset

        return FinetuneDataset(
            store, labels.ids if labels is not None else ids, None if labels is None else labels.values,
            max_audio_seconds=cfg.finetune.max_audio_seconds, max_vision_len=cfg.data.max_vision_len,
            modalities=cfg.data.modalities, augment=cfg.finetune.augment if training else None,
        )  # fmt: skip
    return ClipDataset(
        store,
        labels.ids if labels is not None else ids,
        None if labels is None else labels.values,
        max_audio_len=cfg.data.max_audio_len,
        max_vision_len=cfg.data.max_vision_len,
        max_text_tokens=cfg.data.max_text_tokens,
        text_tokens=cfg.data.text_tokens == "yes",
        modalities=cfg.data.modalities,
    )


#: Settings that may change between an interrupted run and its resumption.
RUNTIME_KEYS = {("train", "device"), ("train", "log_every"), ("train", "eval_batch_size"), ("data", "num_workers")}


def _resume_key(cfg: RunConfig) -> dict:
    d = cfg.to_dict()
    for section, key in RUNTIME_KEYS:
        d[section].pop(key)
    return d


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def build_training_model(cfg: RunConfig) -> tuple[RunConfig, torch.nn.Module]:
    """The model to train and the config it implies. Frozen mode: :class:`TAEMI`. Finetune
    mode: pretrained backbones (freezing, checkpointing applied) + TAEMI, with
    ``model.audio_dim``/``text_dim`` set to the backbones' output sizes."""
    if cfg.mode != "finetune":
        return cfg, build_model(cfg)
    from taemi.finetune.model import FinetuneModel, load_backbones, resolve_finetune_dims

    audio, text = load_backbones(cfg)
    cfg = resolve_finetune_dims(cfg, audio, text)
    return cfg, FinetuneModel(audio, text, build_model(cfg))


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; in fine-tuning two parameter groups: fusion (train.lr) and backbones
    (finetune.backbone_lr). Frozen parameters are left out."""
    tc = cfg.train
    fused = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
    if cfg.mode != "finetune":  # fused: one kernel over all parameters (1.05x per CPU step measured)
        return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas, **fused)
    ft = cfg.finetune
    groups = [{"params": model.fusion_parameters(), "lr": tc.lr, "weight_decay": tc.weight_decay}]
    backbone = model.backbone_parameters()
    if backbone:
        groups.append({"params": backbone, "lr": ft.backbone_lr, "weight_decay": ft.backbone_weight_decay})
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, **fused)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (world 1 = not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR);
    gloo on CPU, NCCL on CUDA. Outside torchrun: world 1, nothing initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce_sum(x: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def epoch_batches(cfg: RunConfig, dataset, store: FeatureStore, epoch: int, dist_info: DistInfo) -> list[list[int]]:
    """This rank's batches (dataset indices) of ``epoch``; they depend on (seed, epoch) only.

    ``data.batching=random``: the shuffled order of a ``RandomSampler`` seeded by (seed,
    epoch), cut into global batches of ``train.batch_size``. ``bucket``: length-bucketed
    global batches (:class:`taemi.data.sampler.LengthBucketBatchSampler`). With N ranks,
    rank r takes its share of every global batch (a last global batch smaller than N is
    completed with its own first clips, as DistributedSampler pads).
    """
    tc = cfg.train
    n = len(dataset)
    if cfg.data.batching == "bucket":
        from taemi.data.sampler import LengthBucketBatchSampler, dataset_lengths

        lengths = dataset_lengths(
            store, dataset.ids, cfg.data.max_audio_len, cfg.data.max_vision_len, modalities=cfg.data.modalities,
            max_text_tokens=cfg.data.max_text_tokens if dataset.text_tokens else None,  # token states are padded too
        )  # fmt: skip
        sampler = LengthBucketBatchSampler(lengths, tc.batch_size, seed=tc.seed, epoch=epoch,
                                           num_replicas=dist_info.world, rank=dist_info.rank)  # fmt: skip
        return [list(map(int, b)) for b in sampler]
    gen = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)  # shuffle depends on (seed, epoch) only
    order = torch.randperm(n, generator=gen).tolist()  # the order RandomSampler(generator=gen) yields
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


def _clip_gradients(model: torch.nn.Module, cfg: RunConfig) -> None:
    if cfg.train.grad_clip <= 0:
        return
    if cfg.train.grad_clip_mode == "value":
        torch.nn.utils.clip_grad_value_(model.parameters(), cfg.train.grad_clip)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)


def _one_line(e: BaseException) -> str:
    """An exception's message as one short line: its first sentence, or its type."""
    text = " ".join(str(e).split()).split(". ")[0]
    return text[:200] or type(e).__name__


class _RunFolder:
    """The run folder while this process trains it (rank 0 only).

    Created if needed (an unusable path is a :class:`RunFolderError` naming it) and locked
    (:class:`RunFolderLock`) until :meth:`close`. ``close(discard=True)``, for a run that
    failed before it saved its first epoch, removes what this process added, and the
    folder itself (and parents) if this process created them, so the stub does not block
    a plain rerun; what was there before is never touched."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.lock = RunFolderLock(run)
        self.created: list[Path] = []  # folders this process made, outermost first
        self.before: set[str] = set()

    def open(self) -> _RunFolder:
        run = self.run
        if run.exists() and not run.is_dir():
            raise RunFolderError(f"cannot use {run} as a run folder: it is a file")
        missing, p = [], run
        while not p.exists() and not p.is_symlink():
            missing.append(p)
            p = p.parent
        if missing and not p.is_dir():
            raise RunFolderError(f"cannot create the run folder {run}: {p} is a file, not a folder")
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"cannot create the run folder {run}: {e.strerror or e}") from None
        self.created = missing[::-1]
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_created()
            raise
        self.before = {q.name for q in run.iterdir()}
        return self

    def close(self, discard: bool) -> None:
        """Release the lock; with ``discard``, first remove what this process added (a
        file that cannot be removed is logged, not raised: the training error matters)."""
        try:
            if discard:
                for q in self.run.iterdir():
                    if q.name in self.before or q.name == LOCK_FILE:
                        continue
                    log.info("removing %s: the run failed before its first epoch was saved", q)
                    try:
                        shutil.rmtree(q) if q.is_dir() and not q.is_symlink() else q.unlink()
                    except OSError as e:
                        log.warning("could not remove %s: %s", q, e)
        finally:
            self.lock.release()
            if discard:
                self._remove_created()

    def _remove_created(self) -> None:
        for d in reversed(self.created):  # innermost first; stop at one that is not empty
            try:
                d.rmdir()
            except OSError:
                break


def _open_run_folder(run: Path, dist_info: DistInfo, device: torch.device) -> _RunFolder | None:
    """Rank 0 creates and locks the run folder; every rank learns whether that worked, so
    that a refused lock stops all of them instead of leaving the others waiting."""
    folder, error = None, None
    if dist_info.main:
        try:
            folder = _RunFolder(run).open()
        except RunFolderError as e:
            error = e
    if dist_info.world > 1:
        failed = _all_reduce_sum(torch.tensor(float(error is not None), device=device), dist_info)
        if float(failed) and error is None:
            raise RunFolderError(f"rank 0 could not open the run folder {run} (see its error)")
    if error is not None:
        raise error
    return folder


def _check_resumable(run: Path, cfg: RunConfig, features: dict, store: FeatureStore) -> None:
    """``--resume`` needs the run's own config and features, and its state.pt once an
    epoch has finished."""
    if not (run / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"cannot resume: {run} holds no run ({CONFIG_FILE} and {STATE_FILE} are missing)")
    saved = load_config(run / CONFIG_FILE)
    if _resume_key(saved) != _resume_key(cfg):
        raise ConfigError(
            f"cannot resume {run}: the config differs from the one it was started with "
            f"({run / CONFIG_FILE}); resume with the same preset and --set options"
        )
    before = load_features_record(run)
    if before is not None and {k: before.get(k) for k in _FEATURE_KEYS} != {k: features[k] for k in _FEATURE_KEYS}:
        raise ConfigError(
            f"cannot resume {run}: it was trained on features of another kind ({run / FEATURES_FILE}: "
            f"{ {k: before.get(k) for k in ('dims', 'dtype', 'text_tokens')} }) than the store {store.root} "
            f"holds ({ {k: features[k] for k in ('dims', 'dtype', 'text_tokens')} }, or other provenance)"
        )
    if not (run / STATE_FILE).is_file() and (run / "last.safetensors").is_file():
        # weights of a finished epoch but no training state: restarting from epoch 1 would
        # silently overwrite them, continuing would not be the same run
        raise RunFolderError(
            f"cannot resume {run}: {run / STATE_FILE} is missing, but last.safetensors shows that epochs "
            f"finished; without the optimiser, scheduler and random states the run cannot continue. Restore "
            f"{STATE_FILE}, or train afresh into another --out"
        )


#: What a state.pt must hold (``torch.load(weights_only=True)``: tensors and plain containers).
_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "history", "best_score", "best_epoch",
               "bad_epochs", "epoch", "best_metrics")  # fmt: skip


def _load_state(path: Path) -> dict:
    """``RUN/state.pt`` through ``torch.load(weights_only=True)``, so no pickled code runs;
    a damaged, truncated or foreign file is a :class:`RunFolderError` naming it."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler stopped: say why in one line
        lines = str(e).splitlines()[1:]  # the first is torch's general advice (to load unsafely: no)
        why = next((ln.strip() for ln in lines if ln.strip() and not ln.startswith(("Please file", "Check the"))),
                   "not a weights-only file")  # fmt: skip
        if "GLOBAL" in why.upper():  # a pickled object (class, function): refused, never run
            raise RunFolderError(
                f"{path} holds pickled objects other than tensors and plain containers; refused without running "
                f"them ({why[:200]})"
            ) from None
        raise RunFolderError(f"{path} cannot be read (damaged or not a taemi state file: {why[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, empty file, not a torch file
        raise RunFolderError(f"{path} cannot be read (damaged or truncated: {_one_line(e)})") from None
    missing = [k for k in _STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise RunFolderError(f"{path} is not a taemi training state (missing {', '.join(missing)})")
    return st


def _warn_on_overlap(train_labels: Labels, valid_labels: Labels) -> None:
    """Validating on training clips makes early stopping and best-epoch selection favour
    memorisation; it is allowed (a smoke test) but said."""
    same = train_labels.source == valid_labels.source
    with contextlib.suppress(OSError):
        same = same or os.path.samefile(train_labels.source, valid_labels.source)
    if same:
        log.warning("the validation labels %s are the training labels: the validation score measures fit, not "
                    "generalisation, and early stopping and best-epoch selection favour memorisation",
                    valid_labels.source)  # fmt: skip
        return
    both = sorted(set(train_labels.ids) & set(valid_labels.ids))
    if both:
        log.warning("%d of the %d validation clips of %s are also training clips of %s (e.g. %s): the validation "
                    "score overstates generalisation", len(both), len(valid_labels), valid_labels.source,
                    train_labels.source, ", ".join(both[:5]))  # fmt: skip


def _nonfinite_inputs(batch) -> list[str]:
    """Ids of the batch's clips whose input features hold NaN/Inf (any float tensor field
    with one row per clip; the target is checked when labels are read)."""
    import dataclasses

    bad = torch.zeros(len(batch), dtype=torch.bool)
    for f in dataclasses.fields(batch):
        x = getattr(batch, f.name)
        if f.name != "target" and isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 1 \
                and x.shape[0] == len(batch):  # fmt: skip
            bad |= ~torch.isfinite(x.reshape(len(batch), -1)).all(dim=1).cpu()
    return [batch.ids[i] for i in torch.nonzero(bad).flatten().tolist()] if batch.ids else []


#: Optimiser steps between two checks of the training loss on an accelerator: each check
#: waits for the device (a host sync), which a launch-bound step cannot afford every time.
#: On the CPU there is nothing to wait for, so every step is checked as it ends.
ACCELERATOR_LOSS_CHECK_STEPS = 10


def _check_step_losses(pending: list[tuple[int, torch.Tensor, list, float]], dist_info: DistInfo, *, epoch: int,
                       steps: int, cfg: RunConfig, store: FeatureStore) -> None:  # fmt: skip
    """Stop at the first optimiser step of ``pending`` ((step, losses of its micro-batches,
    its micro-batches, learning rate) each) whose loss, on any rank, is NaN/Inf, naming the
    step and the likely cause: features holding NaN/Inf, or a diverging optimisation.

    One host sync (and under DDP one small all-reduce) per call, so every rank stops at the
    same step."""
    flags = torch.stack([(~torch.isfinite(losses)).any() for _, losses, _, _ in pending]).float()  # (k,)
    if dist_info.world > 1:
        flags = _all_reduce_sum(flags, dist_info)
    flags = flags.cpu()  # the sync: the price of stopping within a few steps
    if not bool(flags.any()):
        return
    step, losses, group, lr = pending[int(torch.nonzero(flags).flatten()[0])]
    where = f"training stopped at epoch {epoch}, step {step} of {steps}"
    if bool(torch.isfinite(losses).all()):  # DDP: another rank saw it and reports the cause
        raise TrainingError(f"{where}: the training loss of another process is NaN/Inf (see its error)")
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
    if valid_labels is None:
        if fixed_epochs is None:
            raise ValueError("training without validation labels needs fixed_epochs (how many epochs to run)")
        if not 1 <= fixed_epochs <= cfg.train.max_epochs:
            raise ConfigError(
                f"fixed_epochs={fixed_epochs} must be between 1 and train.max_epochs={cfg.train.max_epochs} "
                "(the length of the learning-rate schedule); raise train.max_epochs"
            )
        if cfg.train.patience:
            log.info("no validation split: early stopping is off (train.patience %d -> 0)", cfg.train.patience)
            cfg = replace(cfg, train=replace(cfg.train, patience=0))
    elif fixed_epochs is not None:
        raise ValueError(
            "fixed_epochs is for training without validation (valid_labels=None); with a validation "
            "split use train.max_epochs (and train.patience=0 to turn early stopping off)"
        )
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    cfg = resolve_text_tokens(cfg.validate(), store)
    check_store_fits(cfg, store)
    tc = cfg.train
    dist_info = init_distributed(tc.device)
    device = resolve_device(tc.device)
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    precision = resolve_precision(tc.precision, device)
    if valid_labels is not None:
        valid_labels.check_scorable("validation")
        _warn_on_overlap(train_labels, valid_labels)
    train_ds = make_dataset(cfg, store, train_labels, training=True)  # checked before the run folder is touched
    valid_ds = None if valid_labels is None else make_dataset(cfg, store, valid_labels)
    last_epoch = tc.max_epochs if fixed_epochs is None else fixed_epochs
    run = Path(out_dir)
    state_path = run / STATE_FILE
    folder = _open_run_folder(run, dist_info, device)  # rank 0: created if needed, locked until we return
    saved_epoch = False  # whether this process has written a finished epoch to the run folder
    discard = False
    try:
        seed_everything(tc.seed, tc.deterministic)
        cfg, model = build_training_model(cfg)  # fine-tuning: loads the backbones, sets their sizes
        features = features_record(store)
        if cfg.mode == "finetune":
            features["backbones"] = {
                role: {"backbone": bb.name, "settings": bb.settings}
                for role, bb in (("audio", model.audio), ("text", model.text))
            }
        if resume:
            _check_resumable(run, cfg, features, store)
        elif (run / CONFIG_FILE).exists():
            raise FileExistsError(f"{run} already holds a run; use --resume to continue it or choose another --out")
        _barrier(dist_info)  # every rank has checked the folder before rank 0 writes to it
        main = dist_info.main
        if main:
            save_config(cfg, run / CONFIG_FILE)
            _atomic_write_text(run / FEATURES_FILE, json.dumps(features, indent=2, default=str))
            if cfg.mode == "finetune":
                from taemi.finetune.model import save_backbone_architectures

                save_backbone_architectures(model, run)

        model = model.to(device)
        optimizer = make_optimizer(cfg, model)
        accum = tc.grad_accum_steps
        steps_per_epoch = math.ceil(math.ceil(len(train_ds) / tc.batch_size) / accum)
        warmup = max(1, round(tc.warmup_epochs * steps_per_epoch)) if tc.warmup_epochs > 0 else 0
        scheduler = make_scheduler(optimizer, warmup, tc.max_epochs * steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

        history: list[dict] = []
        best_score, best_epoch, bad_epochs, start_epoch = -math.inf, 0, 0, 1
        best_metrics: Metrics | None = None
        if resume and not state_path.is_file():
            log.info("%s was interrupted before its first epoch finished: starting it from epoch 1", run)
        elif resume:
            st = _load_state(state_path)
            if st.get("fixed_epochs") != fixed_epochs:
                raise ConfigError(
                    f"cannot resume {run}: it was started with fixed_epochs={st.get('fixed_epochs')} "
                    f"(train on all: {st.get('fixed_epochs') is not None}), now fixed_epochs={fixed_epochs}"
                )
            try:
                model.load_state_dict(st["model"])
                optimizer.load_state_dict(st["optimizer"])
                scheduler.load_state_dict(st["scheduler"])
                scaler.load_state_dict(st["scaler"])
                ranks = st.get("rng_ranks")
                if dist_info.world > 1 and ranks is not None and len(ranks) == dist_info.world:
                    _restore_rng(ranks[dist_info.rank])
                else:
                    if dist_info.world > 1 or (ranks is not None and len(ranks) > 1):
                        log.warning("resuming with %d processes a run saved with %s: random draws (dropout) differ "
                                    "from an uninterrupted run", dist_info.world, len(ranks) if ranks else 1)  # fmt: skip
                    _restore_rng(st["rng"] if "rng" in st else {"torch": st["rng_cpu"]})  # rng_cpu: older runs
                if device.type == "cuda" and st.get("rng_cuda") is not None:
                    torch.cuda.set_rng_state(st["rng_cuda"], device)
                history, best_score, best_epoch = st["history"], st["best_score"], st["best_epoch"]
                bad_epochs, start_epoch = st["bad_epochs"], st["epoch"] + 1
                best_metrics = Metrics(**st["best_metrics"]) if st["best_metrics"] else None
            except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a state.pt of another model or version
                raise RunFolderError(
                    f"{state_path} does not fit this run ({type(e).__name__}: {_one_line(e)}); "
                    "it is not the training state this run folder wrote"
                ) from None
            log.info("resuming %s after epoch %d (best %.4f at epoch %d)", run, st["epoch"], best_score, best_epoch)
        fixed = {"fixed_epochs": fixed_epochs, "train_clips": len(train_ds)}

        collate = train_ds.collator()
        train_model = model
        if dist_info.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            if not resume or not state_path.is_file():
                torch.manual_seed(tc.seed + 1_000_003 * dist_info.rank)  # ranks draw different dropout masks
            train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.mode == "finetune",  # a batch without audio skips the audio backbone
            )  # fmt: skip
        if tc.compile:  # the weights stay in `model` (saving, validation); the compiled module shares them
            train_model = torch.compile(train_model, dynamic=True)
        stopped_early = bool(history) and tc.patience > 0 and bad_epochs >= tc.patience
        log.info(
            "training %s%s (%d parameters, %d trainable) on %d clips, %s; %s, %s",
            cfg.preset, " end to end (finetune)" if cfg.mode == "finetune" else "",
            sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad),
            len(train_ds),
            f"validating on {len(valid_ds)}" if valid_ds is not None else f"no validation: exactly {fixed_epochs} epochs",
            device, precision,
        )  # fmt: skip

        for epoch in range(start_epoch, last_epoch + 1):
            if stopped_early:
                break
            t0 = time.perf_counter()
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)  # augmentation draws depend on (seed, epoch, clip)
            batches = epoch_batches(cfg, train_ds, store, epoch, dist_info)
            steps_this_epoch = math.ceil(len(batches) / accum)
            loader = DataLoader(
                train_ds, batch_sampler=batches, num_workers=cfg.data.num_workers, collate_fn=collate,
                pin_memory=device.type == "cuda",
            )  # fmt: skip
            model.train()
            loss_sum, n_seen = torch.zeros((), device=device), 0
            check_every = 1 if device.type == "cpu" else ACCELERATOR_LOSS_CHECK_STEPS
            pending_checks: list[tuple[int, torch.Tensor, list, float]] = []
            bar = tqdm(total=steps_this_epoch, desc=f"epoch {epoch}/{last_epoch}", disable=not (progress and main),
                       leave=False, unit="step")  # fmt: skip
            for step, group in enumerate(_micro_batch_groups(loader, accum), 1):
                # one optimiser step over the group's micro-batches (of all ranks); each micro-batch's
                # mean loss is weighted by its share of the step's clips, so the step's loss is their mean
                n_group = sum(len(b) for b in group)
                if dist_info.world > 1:  # DDP averages gradients over ranks: weight by world / global count
                    n_group = int(_all_reduce_sum(torch.tensor(n_group, device=device), dist_info)) / dist_info.world
                optimizer.zero_grad(set_to_none=True)
                step_losses = []
                for j, batch in enumerate(group):
                    batch = batch.to(device, non_blocking=True)
                    sync = dist_info.world == 1 or j == len(group) - 1  # all-reduce once per optimiser step
                    with contextlib.nullcontext() if sync else train_model.no_sync():
                        with autocast(device, precision):
                            pred = train_model(batch)  # (B, E)
                        loss = F.mse_loss(pred.float(), batch.target)
                        weight = len(batch) / n_group
                        scaler.scale(loss * weight if weight != 1.0 else loss).backward()
                    step_losses.append(loss.detach())
                    loss_sum += loss.detach() * len(batch)  # stays on the device
                    n_seen += len(batch)
                pending_checks.append((step, torch.stack(step_losses), group, scheduler.get_last_lr()[0]))
                if len(pending_checks) >= check_every or step == steps_this_epoch:
                    _check_step_losses(pending_checks, dist_info, epoch=epoch, steps=steps_this_epoch, cfg=cfg,
                                       store=store)  # fmt: skip
                    pending_checks = []
                bar.update(1)
                scaler.unscale_(optimizer)
                _clip_gradients(model, cfg)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if progress and main and (step % 10 == 0 or step == steps_this_epoch):
                    bar.set_postfix(loss=f"{loss_sum.item() / n_seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if main and tc.log_every and step % tc.log_every == 0:
                    log.info("epoch %d step %d: train loss %.5f", epoch, step, loss_sum.item() / n_seen)
            bar.close()
            if dist_info.world > 1:  # the epoch's train loss over every rank's clips
                totals = _all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(float(n_seen), device=device)]),
                                         dist_info)  # fmt: skip
                loss_sum, n_seen = totals[0], int(totals[1])
            loss_sum = float(loss_sum)
            _check_weights(model, epoch, cfg)  # the epoch's last step may have made them non-finite

            if valid_ds is None:  # train on all: no validation, the last epoch is the model
                row = {"epoch": epoch, "train_loss": loss_sum / max(n_seen, 1), "lr": scheduler.get_last_lr()[0],
                       "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
                history.append(row)
                best_epoch = epoch
                if main:
                    save_weights(model, run / "best.safetensors")
                log.info("epoch %d/%d: train loss %.4f", epoch, last_epoch, row["train_loss"])
            else:
                pred, valid_loss = predict_dataset(
                    model, valid_ds, batch_size=tc.eval_batch_size, device=device, precision=precision,
                    num_workers=cfg.data.num_workers, progress=progress and main, desc="validate",
                )  # fmt: skip
                check_finite_predictions(
                    pred, valid_ds.ids, f"validation after epoch {epoch}",
                    cause=f"the weights are finite, so the features of these clips in {store.root} hold NaN/Inf "
                          f"(`taemi store verify {store.root}`)",
                )  # fmt: skip
                metrics = compute_metrics(pred, valid_ds.targets, cfg.data.emotions)
                row = {
                    "epoch": epoch,
                    "train_loss": loss_sum / max(n_seen, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "valid_loss": valid_loss,
                    "valid_mean_pearson": metrics.mean_pearson,
                    **{f"pearson_{e}": metrics.pearson[e] for e in cfg.data.emotions},
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                history.append(row)
                improved = metrics.mean_pearson > best_score
                if improved:
                    best_score, best_epoch, bad_epochs, best_metrics = metrics.mean_pearson, epoch, 0, metrics
                    if main:
                        save_weights(model, run / "best.safetensors")
                        _write_valid_predictions(run / "valid_predictions.csv", valid_ds.ids, cfg.data.emotions, pred)
                else:
                    bad_epochs += 1
                log.info(
                    "epoch %d: train loss %.4f, valid loss %.4f, valid mean Pearson %.4f%s",
                    epoch, row["train_loss"], valid_loss, metrics.mean_pearson, " (best)" if improved else "",
                )  # fmt: skip
            stopped_early = tc.patience > 0 and bad_epochs >= tc.patience
            rng_ranks = _gather_rng_states(dist_info)
            if main:
                save_weights(model, run / "last.safetensors")
                _save_state(state_path, model, optimizer, scheduler, scaler, device, epoch=epoch, history=history,
                            best_score=best_score, best_epoch=best_epoch, bad_epochs=bad_epochs,
                            best_metrics=best_metrics, fixed_epochs=fixed_epochs, rng_ranks=rng_ranks,
                            world_size=dist_info.world)  # fmt: skip
                _write_history(run / "history.csv", history)
                _write_metrics(run, best_epoch, best_metrics, history, stopped_early, finished=False,
                               device=str(device), precision=precision, world_size=dist_info.world, **fixed)  # fmt: skip
                saved_epoch = True
            _barrier(dist_info)  # the epoch is on disk before any rank moves on (or is interrupted)
            for cb in callbacks:
                cb(epoch, row)
            if stopped_early:
                log.info("early stopping: no improvement for %d epochs; best epoch %d", tc.patience, best_epoch)

        if main:
            _write_metrics(run, best_epoch, best_metrics, history, stopped_early, finished=True,
                           device=str(device), precision=precision, world_size=dist_info.world, **fixed)  # fmt: skip
            if valid_ds is not None:
                assert best_metrics is not None
                plot_history(history, run / "plots" / "learning_curves.png")
                plot_per_emotion(best_metrics.pearson, run / "plots" / "per_emotion_pearson.png",
                                 title=f"valid Pearson per emotion (best epoch {best_epoch})")  # fmt: skip
        _barrier(dist_info)
    except Exception:
        discard = not saved_epoch  # a failed start leaves no stub that would block a plain rerun
        raise
    finally:
        if folder is not None:
            folder.close(discard=discard)
    return TrainResult(run, best_epoch, best_metrics, history, stopped_early)


def _rng_snapshot() -> dict:
    """The CPU random states a training step may draw from: torch (dropout, modality
    dropout), numpy (e.g. SpecAugment masks inside Hugging Face wav2vec2 backbones) and
    Python's ``random``; plain types, loadable with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}  # fmt: skip


def _restore_rng(snap: dict) -> None:
    torch.set_rng_state(snap["torch"])
    if "numpy" in snap:
        name, keys, pos, has_gauss, gauss = snap["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in snap:
        version, internal, gauss_next = snap["python"]
        random.setstate((version, tuple(internal), gauss_next))


def _gather_rng_states(dist_info: DistInfo) -> list[dict] | None:
    """Every rank's random states (rank order), for an exact distributed resume."""
    if dist_info.world == 1:
        return None
    import torch.distributed as dist

    states: list = [None] * dist_info.world
    dist.all_gather_object(states, _rng_snapshot())
    return states


def _save_state(path: Path, model, optimizer, scheduler, scaler, device, **extra) -> None:
    best = extra.pop("best_metrics")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_snapshot(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "best_metrics": None if best is None else best.__dict__,
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_metrics(run: Path, best_epoch: int, best: Metrics | None, history: list[dict], stopped_early: bool,
                   finished: bool, device: str, precision: str, fixed_epochs: int | None,
                   train_clips: int, world_size: int = 1) -> None:  # fmt: skip
    data = {
        "best_epoch": best_epoch,
        "valid": None if best is None else best.to_dict(),
        "train_on_all": fixed_epochs is not None,
        "fixed_epochs": fixed_epochs,
        "train_clips": train_clips,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "finished": finished,
        "predictions": "raw (not clipped)",
        "device": device,
        "precision": precision,
        "processes": world_size,
    }
    _atomic_write_text(run / METRICS_FILE, json.dumps(data, indent=2))


def _write_valid_predictions(path: Path, ids, emotions, pred: np.ndarray) -> None:
    from taemi.data.labels import write_predictions

    write_predictions(path, ids, emotions, pred, clip=False)
