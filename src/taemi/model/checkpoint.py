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
``fusion.*``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from taemi.config import ConfigError, RunConfig, load_config, save_config
from taemi.model.taemi import TAEMI

CONFIG_FILE = "config.yaml"


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
    state = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"weights {path} do not fit the model: missing keys {missing}, unexpected keys {extra}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"weights {path}: {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")
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
