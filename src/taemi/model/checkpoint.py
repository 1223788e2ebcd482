"""Run folders: the weights and resolved config a trained model is made of.

A run folder holds at least::

    RUN/config.yaml          resolved RunConfig (preset + overrides), loaded strictly
    RUN/best.safetensors     weights of the epoch with the best validation mean Pearson
    RUN/last.safetensors     weights after the last finished epoch

Training also writes ``features.json`` (the store's dims and per-modality provenance,
so ``taemi predict`` on media extracts features the same way), ``state.pt`` (optimiser,
scheduler, scaler, RNG states: what ``--resume`` needs), ``history.csv``,
``metrics.json`` and ``plots/``. A fine-tuning run (``mode: finetune``) also holds
``backbones/audio`` and ``backbones/text`` (the backbones' configs and tokenizer, no
weights); its safetensors hold backbone and fusion weights (``audio.*``, ``text.*``,
``fusion.*``). While a process trains the folder it holds ``RUN/.lock``
(:class:`RunFolderLock`).

Reading is defensive: a damaged, truncated or foreign file (weights, ``metrics.json``)
raises :class:`RunFolderError` naming the file and the problem, and weights holding
NaN/Inf are refused on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taemi.config import ConfigError, RunConfig, load_config, save_config
from taemi.locking import acquire_lock, release_lock
from taemi.model.taemi import TAEMI

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
#: Held (fcntl.flock) by the process training the folder; see :class:`RunFolderLock`.
LOCK_FILE = ".lock"
#: How many offending names an error message lists.
_LISTED = 5


class RunFolderError(ValueError):
    """A run folder, or a file in it, that cannot be used; the message names the file."""


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (f" ... ({len(names)} in all)" if len(names) > _LISTED else "")


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Write the model's parameters (and persistent buffers) as safetensors, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        # safetensors refuses tensors sharing memory (tied weights, weight-norm views in
        # wav2vec2 backbones): each such alias is stored as its own copy
        tensors[k] = v.clone() if ptr is not None and ptr[0] in seen else v
        if ptr is not None:
            seen.add(ptr[0])
    save_file(tensors, str(tmp), metadata={"format": "taemi"})
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights strictly: every key present, none extra, shapes equal."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:  # empty, truncated, not safetensors at all
        raise RunFolderError(f"weights {path} cannot be read (damaged or not a safetensors file: {e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise RunFolderError(
            f"weights {path} do not fit the model: missing keys [{_listed(missing)}], "
            f"unexpected keys [{_listed(extra)}]"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise RunFolderError(
                f"weights {path}: {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}"
            )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RunFolderError(
            f"weights {path} hold NaN/Inf values in {len(bad)} tensor(s) ({_listed(bad)}): the file is damaged "
            "or the training that wrote it diverged"
        )
    model.load_state_dict(state, strict=True)


def build_model(cfg: RunConfig) -> TAEMI:
    return TAEMI(cfg.model, num_outputs=len(cfg.data.emotions))


def write_run(run_dir: str | Path, cfg: RunConfig, model: torch.nn.Module, *, names: tuple[str, ...] = ("best", "last")) -> Path:
    """Create a run folder holding ``cfg`` and ``model``'s weights under each of ``names``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    for name in names:
        save_weights(model, run_dir / f"{name}.safetensors")
    return run_dir


def read_metrics(run_dir: str | Path) -> dict | None:
    """``RUN/metrics.json`` as a mapping, or None when the run has none (an imported
    release); a file that is not a JSON object raises :class:`RunFolderError` naming it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} should hold a JSON object, got a {type(data).__name__}")
    return data


class RunFolderLock:
    """An exclusive lock on a run folder: ``fcntl.flock`` on ``RUN/.lock``, taken without
    waiting, so a second process training (or resuming) the same folder fails at once.

    The same lock as the feature store's writer lock (:mod:`taemi.locking`). POSIX only."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        self._fd = acquire_lock(self.path, RunFolderError, self._held)
        return self

    def _held(self, who: str) -> str:
        return (f"{self.run_dir} is being trained by another process{who} (lock {self.path} is held); "
                "wait for it to finish or use another run folder")  # fmt: skip

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        release_lock(self.path, fd)

    def __enter__(self) -> RunFolderLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def load_run(run_dir: str | Path, which: str = "best") -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the model of a run folder from its config and ``which`` weights; eval mode.

    A ``mode: finetune`` run gives a :class:`~taemi.finetune.model.FinetuneModel` (its
    weights hold the fine-tuned backbones too); any other a :class:`TAEMI`."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} is not a taemi run folder: {CONFIG_FILE} is missing")
    cfg = load_config(cfg_path)
    if cfg.mode == "finetune":  # backbones + fusion, architecture from RUN/backbones/
        from taemi.finetune.model import load_finetune_model

        model = load_finetune_model(run_dir, cfg)
    else:
        model = build_model(cfg)
    load_weights(model, run_dir / f"{which}.safetensors")
    return model.eval(), cfg
