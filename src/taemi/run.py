"""The run folder: the one owner of its file names and of reading and writing them.

A run folder holds at least::

    RUN/config.yaml          resolved RunConfig (preset + overrides), loaded strictly
    RUN/best.safetensors     weights of the epoch with the best validation mean Pearson
    RUN/last.safetensors     weights after the last finished epoch

Training also writes ``features.json`` (the store's dims and per-modality provenance,
so ``taemi predict`` on media extracts features the same way), ``state.pt`` (optimiser,
scheduler, scaler, RNG states: what ``--resume`` needs, :mod:`taemi.train.state`),
``history.csv``, ``metrics.json``, ``valid_predictions.csv`` (the best epoch's raw
validation predictions), ``plots/`` and, when TensorBoard is installed, ``tensorboard/``
(event files, :mod:`taemi.train.tracking`). A fine-tuning run (``mode: finetune``) also
holds ``backbones/audio`` and ``backbones/text`` (the backbones' configs and tokenizer, no
weights); its safetensors hold backbone and fusion weights (``audio.*``, ``text.*``,
``fusion.*``). An imported release holds ``import.json`` (:mod:`taemi.release`). While a
process trains the folder it holds ``RUN/.lock`` (:class:`RunFolderLock`).

Every other module asks this one for these names and files. Rebuilding the model of a
run (which needs its training mode) is :func:`taemi.inference.load_run`.

Reading is defensive: a damaged, truncated or foreign file (weights, ``metrics.json``,
``features.json``) raises :class:`RunFolderError` naming the file and the problem, and
weights holding NaN/Inf are refused on load.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from taemi.config import ConfigError, RunConfig, load_config, save_config
from taemi.locking import acquire_lock, release_lock

if (
    TYPE_CHECKING
):  # torch and safetensors load with the weights, so reading a run's files stays light
    import numpy as np
    import torch

    from taemi.eval.metrics import Metrics
    from taemi.store import FeatureStore

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
#: The run's record of its input features (see :func:`features_record`).
FEATURES_FILE = "features.json"
#: Training state for ``--resume`` (written and read by :mod:`taemi.train.state`).
STATE_FILE = "state.pt"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
#: The best epoch's raw validation predictions (``taemi compare`` reads them).
VALID_PREDICTIONS_FILE = "valid_predictions.csv"
PLOTS_DIR = "plots"
#: TensorBoard event files (:mod:`taemi.train.tracking`, ``train.tensorboard``).
TENSORBOARD_DIR = "tensorboard"
#: Where an imported release came from (:mod:`taemi.release`).
IMPORT_FILE = "import.json"
#: Held (fcntl.flock) by the process training the folder; see :class:`RunFolderLock`.
LOCK_FILE = ".lock"
#: The two weight files: ``best`` (selected epoch) and ``last`` (last finished epoch).
WEIGHTS = ("best", "last")
#: How many offending names an error message lists.
_LISTED = 5


def weights_file(run_dir: str | Path, which: str) -> Path:
    """``RUN/best.safetensors`` or ``RUN/last.safetensors`` (``which``: one of :data:`WEIGHTS`)."""
    return Path(run_dir) / f"{which}.safetensors"


class RunFolderError(ValueError):
    """A run folder, or a file in it, that cannot be used; the message names the file."""


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (
        f" ... ({len(names)} in all)" if len(names) > _LISTED else ""
    )


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Write the model's parameters (and persistent buffers) as safetensors, atomically."""
    from safetensors.torch import save_file

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
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:  # empty, truncated, not safetensors at all
        raise RunFolderError(
            f"weights {path} cannot be read (damaged or not a safetensors file: {e})"
        ) from None
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
    bad = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise RunFolderError(
            f"weights {path} hold NaN/Inf values in {len(bad)} tensor(s) ({_listed(bad)}): the file is damaged "
            "or the training that wrote it diverged"
        )
    model.load_state_dict(state, strict=True)


def write_run(
    run_dir: str | Path,
    cfg: RunConfig,
    model: torch.nn.Module,
    *,
    names: tuple[str, ...] = ("best", "last"),
) -> Path:
    """Create a run folder holding ``cfg`` and ``model``'s weights under each of ``names``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    for name in names:
        save_weights(model, weights_file(run_dir, name))
    return run_dir


def read_config(run_dir: str | Path) -> RunConfig:
    """``RUN/config.yaml``, loaded strictly; a folder without one is not a run folder."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a taemi run folder: {CONFIG_FILE} is missing")
    return load_config(path)


def has_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run (its config.yaml), finished or not."""
    return (Path(run_dir) / CONFIG_FILE).is_file()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
        return (
            f"{self.run_dir} is being trained by another process{who} (lock {self.path} is held); "
            "wait for it to finish or use another run folder"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        release_lock(self.path, fd)

    def __enter__(self) -> RunFolderLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def experiment_folder(out: str | os.PathLike) -> Path:
    """``--out`` of a command that keeps several runs in one folder (``taemi cv``, ``taemi
    sweep``): a folder or nothing yet, and not a training run's folder (ValueError)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if (out / METRICS_FILE).is_file():
        raise ValueError(f"--out {out} is a training run folder; give a folder of its own")
    return out


def is_finished(run_dir: str | Path) -> bool:
    """Whether the run's ``metrics.json`` says its training finished."""
    return bool((read_metrics(run_dir) or {}).get("finished"))


def write_metrics(
    run_dir: str | Path,
    best_epoch: int,
    best: Metrics | None,
    history: list[dict],
    stopped_early: bool,
    finished: bool,
    device: str,
    precision: str,
    fixed_epochs: int | None,
    train_clips: int,
    world_size: int = 1,
    execution: dict | None = None,
) -> None:
    """``RUN/metrics.json``: the selected epoch, its validation metrics (None when trained
    without validation) and how the run went; written atomically after every epoch.
    ``execution``: how the steps ran (engine, captured shapes, batch source, padding,
    start-up seconds; :class:`taemi.train.trainer.Execution`)."""
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
    if execution is not None:
        data["execution"] = execution
    _atomic_write_text(Path(run_dir) / METRICS_FILE, json.dumps(data, indent=2))


def write_history(run_dir: str | Path, history: list[dict]) -> None:
    """``RUN/history.csv``: one row per finished epoch (nothing before the first)."""
    if not history:
        return
    path = Path(run_dir) / HISTORY_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def write_valid_predictions(
    run_dir: str | Path, ids: Sequence[str], emotions: Sequence[str], pred: np.ndarray
) -> None:
    """``RUN/valid_predictions.csv``: the best epoch's raw (not clipped) predictions (N, E)."""
    from taemi.data.labels import write_predictions

    write_predictions(Path(run_dir) / VALID_PREDICTIONS_FILE, ids, emotions, pred, clip=False)


def plot_path(run_dir: str | Path, name: str) -> Path:
    """``RUN/plots/<name>``."""
    return Path(run_dir) / PLOTS_DIR / name


# --------------------------------------------------------------------------- features.json


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
FEATURE_KEYS = ("dims", "dtype", "text_tokens", "modalities")


def write_features_record(run_dir: str | Path, record: dict) -> None:
    _atomic_write_text(Path(run_dir) / FEATURES_FILE, json.dumps(record, indent=2, default=str))


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
        raise RunFolderError(
            f"{path} is not a features record (a JSON object with the store's dims)"
        )
    return data


# --------------------------------------------------------------------------- the folder while it is trained


class TrainingFolder:
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

    def open(self) -> TrainingFolder:
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
