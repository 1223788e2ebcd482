"""The training state of a run folder (``RUN/state.pt``) and exact resume.

Resume is exact at epoch granularity: everything that decides the next epoch (model,
optimiser, scheduler, grad scaler, RNG states, early-stopping state, history) is saved
atomically in ``state.pt`` after every epoch; the shuffling order of epoch ``e`` depends
only on (seed, e), so an interrupted epoch is redone from its start. ``state.pt`` keeps
every rank's RNG state, so a resumed distributed run with the same number of processes
continues exactly.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from taemi.config import ConfigError, RunConfig
from taemi.eval.metrics import Metrics
from taemi.run import (
    CONFIG_FILE,
    FEATURE_KEYS,
    FEATURES_FILE,
    STATE_FILE,
    RunFolderError,
    load_features_record,
    read_config,
    weights_file,
)
from taemi.store import FeatureStore

if TYPE_CHECKING:
    from taemi.train.distributed import DistInfo

log = logging.getLogger(__name__)

#: Settings that may change between an interrupted run and its resumption.
RUNTIME_KEYS = {
    ("train", "device"),
    ("train", "log_every"),
    ("train", "eval_batch_size"),
    ("data", "num_workers"),
    ("data", "length_quantum"),  # padding: the model's outputs do not depend on it
    ("data", "resident"),
    ("data", "resident_share"),
    ("train", "cuda_graphs"),
    ("train", "graph_shapes"),
    ("train", "precast_weights"),  # the same casts, made once per step instead of per use
    ("train", "tensorboard"),  # experiment tracking: what is logged, not what is trained
    ("train", "mlflow_uri"),
    ("train", "mlflow_experiment"),
}
#: What a state.pt must hold (``torch.load(weights_only=True)``: tensors and plain containers).
_STATE_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "history",
    "best_score",
    "best_epoch",
    "bad_epochs",
    "epoch",
    "best_metrics",
)


@dataclass
class Progress:
    """Where training stands: what early stopping and model selection remember."""

    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    start_epoch: int = 1
    best_metrics: Metrics | None = None


def one_line(e: BaseException) -> str:
    """An exception's message as one short line: its first sentence, or its type."""
    text = " ".join(str(e).split()).split(". ")[0]
    return text[:200] or type(e).__name__


def _resume_key(cfg: RunConfig) -> dict:
    d = cfg.to_dict()
    for section, key in RUNTIME_KEYS:
        d[section].pop(key)
    return d


def check_resumable(run: Path, cfg: RunConfig, features: dict, store: FeatureStore) -> None:
    """``--resume`` needs the run's own config and features, and its state.pt once an
    epoch has finished."""
    if not (run / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"cannot resume: {run} holds no run ({CONFIG_FILE} and {STATE_FILE} are missing)"
        )
    saved = read_config(run)
    if _resume_key(saved) != _resume_key(cfg):
        raise ConfigError(
            f"cannot resume {run}: the config differs from the one it was started with "
            f"({run / CONFIG_FILE}); resume with the same preset and --set options"
        )
    before = load_features_record(run)
    if before is not None and {k: before.get(k) for k in FEATURE_KEYS} != {
        k: features[k] for k in FEATURE_KEYS
    }:
        raise ConfigError(
            f"cannot resume {run}: it was trained on features of another kind ({run / FEATURES_FILE}: "
            f"{ {k: before.get(k) for k in ('dims', 'dtype', 'text_tokens')} }) than the store {store.root} "
            f"holds ({ {k: features[k] for k in ('dims', 'dtype', 'text_tokens')} }, or other provenance)"
        )
    if not (run / STATE_FILE).is_file() and weights_file(run, "last").is_file():
        # weights of a finished epoch but no training state: restarting from epoch 1 would
        # silently overwrite them, continuing would not be the same run
        raise RunFolderError(
            f"cannot resume {run}: {run / STATE_FILE} is missing, but last.safetensors shows that epochs "
            f"finished; without the optimiser, scheduler and random states the run cannot continue. Restore "
            f"{STATE_FILE}, or train afresh into another --out"
        )


def load_state(path: Path) -> dict:
    """``RUN/state.pt`` through ``torch.load(weights_only=True)``, so no pickled code runs;
    a damaged, truncated or foreign file is a :class:`RunFolderError` naming it."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError
    ) as e:  # torch's weights-only unpickler stopped: say why in one line
        lines = str(e).splitlines()[
            1:
        ]  # the first is torch's general advice (to load unsafely: no)
        why = next(
            (
                ln.strip()
                for ln in lines
                if ln.strip() and not ln.startswith(("Please file", "Check the"))
            ),
            "not a weights-only file",
        )
        if "GLOBAL" in why.upper():  # a pickled object (class, function): refused, never run
            raise RunFolderError(
                f"{path} holds pickled objects other than tensors and plain containers; refused without running "
                f"them ({why[:200]})"
            ) from None
        raise RunFolderError(
            f"{path} cannot be read (damaged or not a taemi state file: {why[:200]})"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
    ) as e:  # truncated zip, empty file, not a torch file
        raise RunFolderError(
            f"{path} cannot be read (damaged or truncated: {one_line(e)})"
        ) from None
    missing = [k for k in _STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise RunFolderError(f"{path} is not a taemi training state (missing {', '.join(missing)})")
    return st


def _plain_rates(state: dict) -> dict:
    """Learning rates as Python floats: a captured step keeps them as device tensors
    (:mod:`taemi.train.step`), and a state.pt must load on any device and any engine."""

    def plain(v):
        return float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v

    for g in state.get("param_groups", ()):
        for key in ("lr", "initial_lr"):
            if key in g:
                g[key] = plain(g[key])
    for key in ("_last_lr", "base_lrs"):
        if isinstance(state.get(key), list):
            state[key] = [plain(v) for v in state[key]]
    return state


def save_state(path: Path, model, optimizer, scheduler, scaler, device, **extra) -> None:
    """Write ``state.pt`` atomically: model, optimiser, scheduler, scaler, this process's
    RNG states and ``extra`` (progress, ``rng_ranks``, ...)."""
    best = extra.pop("best_metrics")
    state = {
        "model": model.state_dict(),
        "optimizer": _plain_rates(optimizer.state_dict()),
        "scheduler": _plain_rates(scheduler.state_dict()),
        "scaler": scaler.state_dict(),
        "rng": rng_snapshot(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "best_metrics": None if best is None else best.__dict__,
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume_state(
    path: Path,
    model,
    optimizer,
    scheduler,
    scaler,
    device: torch.device,
    dist_info: DistInfo,
    fixed_epochs: int | None,
) -> Progress:
    """Load ``path`` (a state.pt) into the model, optimiser, scheduler, scaler and RNGs;
    the progress to continue from. A run interrupted before its first epoch finished has
    none: it starts from epoch 1."""
    run = path.parent
    if not path.is_file():
        log.info(
            "%s was interrupted before its first epoch finished: starting it from epoch 1", run
        )
        return Progress()
    st = load_state(path)
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
            restore_rng(ranks[dist_info.rank])
        else:
            if dist_info.world > 1 or (ranks is not None and len(ranks) > 1):
                log.warning(
                    "resuming with %d processes a run saved with %s: random draws (dropout) differ "
                    "from an uninterrupted run",
                    dist_info.world,
                    len(ranks) if ranks else 1,
                )
            restore_rng(
                st["rng"] if "rng" in st else {"torch": st["rng_cpu"]}
            )  # rng_cpu: older runs
        if device.type == "cuda" and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"], device)
        progress = Progress(
            history=st["history"],
            best_score=st["best_score"],
            best_epoch=st["best_epoch"],
            bad_epochs=st["bad_epochs"],
            start_epoch=st["epoch"] + 1,
            best_metrics=Metrics(**st["best_metrics"]) if st["best_metrics"] else None,
        )
    except (
        KeyError,
        TypeError,
        ValueError,
        RuntimeError,
    ) as e:  # a state.pt of another model or version
        raise RunFolderError(
            f"{path} does not fit this run ({type(e).__name__}: {one_line(e)}); "
            "it is not the training state this run folder wrote"
        ) from None
    log.info(
        "resuming %s after epoch %d (best %.4f at epoch %d)",
        run,
        st["epoch"],
        progress.best_score,
        progress.best_epoch,
    )
    return progress


def rng_snapshot() -> dict:
    """The CPU random states a training step may draw from: torch (dropout, modality
    dropout), numpy (e.g. SpecAugment masks inside Hugging Face wav2vec2 backbones) and
    Python's ``random``; plain types, loadable with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def restore_rng(snap: dict) -> None:
    torch.set_rng_state(snap["torch"])
    if "numpy" in snap:
        name, keys, pos, has_gauss, gauss = snap["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in snap:
        version, internal, gauss_next = snap["python"]
        random.setstate((version, tuple(internal), gauss_next))
