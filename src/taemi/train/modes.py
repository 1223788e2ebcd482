"""Training modes: what differs between training the fusion model on stored features
(``mode: frozen``) and training it end to end with its audio and text backbones on raw
audio and transcripts (``mode: finetune``; docs/method.md section 6).

A mode object supplies the pieces that differ: which modalities the feature store must
fit, the dataset, the model (and the config it implies), the optimiser's parameter
groups, what the run folder records beyond the fusion weights, and how the model of a
saved run is rebuilt. :func:`mode_for` is the one place that picks a mode from
``cfg.mode``; the trainer, evaluation and prediction ask the mode.

Every config built over a store goes through :func:`config_for_store`: the model's input
sizes come from the store unless the user set them; in
fine-tuning the backbones then decide ``model.audio_dim`` and ``model.text_dim``
(:meth:`FinetuneMode.build`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from taemi import MODALITIES
from taemi.config import ConfigError, RunConfig, build_config, input_dim_overrides
from taemi.data.dataset import ClipDataset
from taemi.data.labels import Labels
from taemi.model.taemi import TAEMI
from taemi.run import CONFIG_FILE, FEATURES_FILE, features_record
from taemi.store import FeatureStore

log = logging.getLogger(__name__)


def build_model(cfg: RunConfig) -> TAEMI:
    """The fusion model ``cfg`` describes (untrained)."""
    return TAEMI(cfg.model, num_outputs=len(cfg.data.emotions))


# --------------------------------------------------------------------------- input sizes


def config_for_store(
    preset: str,
    overrides: Sequence[tuple[str, Any]],
    store: FeatureStore,
    config_file: str | os.PathLike | None = None,
) -> RunConfig:
    """Preset + ``config_file`` + ``overrides``, with the model's input sizes taken from
    ``store`` unless ``overrides`` or the file's ``model:`` section set them
    (:func:`taemi.config.input_dim_overrides`); the choice is logged and lands in the
    run's config.yaml. Training, the demo and the ablation grid build their configs here."""
    auto = input_dim_overrides(store.dims, overrides, config_file)
    if auto:
        log.info(
            "model input sizes from the store %s: %s",
            store.root,
            ", ".join(f"{k}={v}" for k, v in auto),
        )
    return build_config(preset, [*auto, *overrides], config_file)


def _check_labels(cfg: RunConfig, labels: Labels | None) -> None:
    if labels is not None and tuple(labels.emotions) != tuple(cfg.data.emotions):
        raise ConfigError(
            f"labels {labels.source} have emotions {list(labels.emotions)} but the config expects "
            f"{list(cfg.data.emotions)} (data.emotions)"
        )


# --------------------------------------------------------------------------- the modes


class FrozenMode:
    """Train the fusion model (:class:`TAEMI`) on the feature store's features."""

    name = "frozen"
    #: The modalities whose feature sizes must equal the store's.
    store_modalities: tuple[str, ...] = MODALITIES
    #: Said in the training log after the preset's name.
    description = ""
    #: DDP: whether a step may leave parameters without gradients.
    find_unused_parameters = False
    #: Whether the model reads the raw audio (the store's waveform cache).
    reads_waveforms = False
    #: Whether the datasets are stored features only (:class:`ClipDataset`): what batches
    #: resident on the device and captured steps (:mod:`taemi.train.step`) need.
    stored_features = True

    def resolve_text_tokens(self, cfg: RunConfig, store: FeatureStore) -> RunConfig:
        """Turn ``data.text_tokens=auto`` into yes/no: token states are used when the store
        has them and text is a key/value modality (non-text anchor)."""
        mode = cfg.data.text_tokens
        if mode == "auto":
            mode = "yes" if store.has_text_tokens and cfg.model.anchor != "text" else "no"
        if mode == "yes" and not store.has_text_tokens:
            raise ConfigError(
                f"data.text_tokens=yes but the store {store.root} has no text token states"
            )
        return replace(cfg, data=replace(cfg.data, text_tokens=mode))

    def dataset(
        self,
        cfg: RunConfig,
        store: FeatureStore,
        labels: Labels | None,
        ids=None,
        *,
        training: bool = False,
    ):
        """A :class:`ClipDataset` of the stored features of ``labels``' clips (or ``ids``)."""
        _check_labels(cfg, labels)
        return ClipDataset(
            store,
            labels.ids if labels is not None else ids,
            None if labels is None else labels.values,
            max_audio_len=cfg.data.max_audio_len,
            max_vision_len=cfg.data.max_vision_len,
            max_text_tokens=cfg.data.max_text_tokens,
            text_tokens=cfg.data.text_tokens == "yes",
            modalities=cfg.data.modalities,
            length_quantum=cfg.data.length_quantum or 1,  # 0 (auto) is resolved by the trainer
        )

    def build(self, cfg: RunConfig) -> tuple[RunConfig, nn.Module]:
        """The model to train and the config it implies."""
        return cfg, build_model(cfg)

    def param_groups(self, cfg: RunConfig, model: nn.Module) -> list[dict]:
        """The optimiser's parameter groups: one, every parameter, at ``train.lr``."""
        return [{"params": list(model.parameters())}]

    def features(self, store: FeatureStore, model: nn.Module) -> dict:
        """The run's ``features.json`` record."""
        return features_record(store)

    def save_architecture(self, model: nn.Module, run: Path) -> None:
        """What the run folder needs beyond config and weights to rebuild the model: nothing."""

    def rebuild(self, run: Path, cfg: RunConfig) -> nn.Module:
        """The model architecture of a saved run (weights not loaded)."""
        return build_model(cfg)


class FinetuneMode(FrozenMode):
    """Train the audio and text backbones end to end with the fusion model
    (:class:`~taemi.finetune.model.FinetuneModel`): raw audio and transcripts, vision
    from the store."""

    stored_features = False  # raw waveforms and transcripts: no resident batches, no graphs

    name = "finetune"
    store_modalities = ("vision",)  # audio and text come from the backbones
    description = " end to end (finetune)"
    find_unused_parameters = True  # a batch without audio skips the audio backbone
    reads_waveforms = True  # the audio backbone runs on the raw audio

    def resolve_text_tokens(self, cfg: RunConfig, store: FeatureStore) -> RunConfig:
        return replace(
            cfg, data=replace(cfg.data, text_tokens="no")
        )  # the text backbone gives one vector per clip

    def dataset(
        self,
        cfg: RunConfig,
        store: FeatureStore,
        labels: Labels | None,
        ids=None,
        *,
        training: bool = False,
    ):
        """A :class:`~taemi.finetune.data.FinetuneDataset` of raw audio, transcripts and
        stored vision (augmented when ``training``)."""
        from taemi.finetune.data import FinetuneDataset

        _check_labels(cfg, labels)
        return FinetuneDataset(
            store,
            labels.ids if labels is not None else ids,
            None if labels is None else labels.values,
            max_audio_seconds=cfg.finetune.max_audio_seconds,
            max_vision_len=cfg.data.max_vision_len,
            modalities=cfg.data.modalities,
            augment=cfg.finetune.augment if training else None,
        )

    def build(self, cfg: RunConfig) -> tuple[RunConfig, nn.Module]:
        """Pretrained backbones (freezing, checkpointing applied) + TAEMI; the backbones'
        output sizes decide ``model.audio_dim``/``text_dim`` (the change is logged)."""
        from taemi.finetune.model import FinetuneModel, load_backbones

        audio, text = load_backbones(cfg)
        cfg = backbone_sizes(cfg, audio, text)
        return cfg, FinetuneModel(audio, text, build_model(cfg))

    def param_groups(self, cfg: RunConfig, model: nn.Module) -> list[dict]:
        """Two groups: fusion (``train.lr``) and backbones (``finetune.backbone_lr``);
        frozen parameters are left out."""
        tc, ft = cfg.train, cfg.finetune
        groups = [
            {"params": model.fusion_parameters(), "lr": tc.lr, "weight_decay": tc.weight_decay}
        ]
        backbone = model.backbone_parameters()
        if backbone:
            groups.append(
                {"params": backbone, "lr": ft.backbone_lr, "weight_decay": ft.backbone_weight_decay}
            )
        return groups

    def features(self, store: FeatureStore, model: nn.Module) -> dict:
        record = features_record(store)
        record["backbones"] = {
            role: {"backbone": bb.name, "settings": bb.settings}
            for role, bb in (("audio", model.audio), ("text", model.text))
        }
        return record

    def save_architecture(self, model: nn.Module, run: Path) -> None:
        from taemi.finetune.model import save_backbone_architectures

        save_backbone_architectures(model, run)

    def rebuild(self, run: Path, cfg: RunConfig) -> nn.Module:
        """Backbones + fusion, the architecture from ``RUN/backbones/``."""
        from taemi.finetune.model import load_finetune_model

        return load_finetune_model(run, cfg)


def backbone_sizes(cfg: RunConfig, audio: nn.Module, text: nn.Module) -> RunConfig:
    """In fine-tuning the backbones decide ``model.audio_dim``/``model.text_dim`` (logged)."""
    m = cfg.model
    if (m.audio_dim, m.text_dim) != (audio.dim, text.dim):
        log.info(
            "finetune: model.audio_dim %d -> %d and model.text_dim %d -> %d (the backbones' output sizes)",
            m.audio_dim,
            audio.dim,
            m.text_dim,
            text.dim,
        )
    return replace(cfg, model=replace(m, audio_dim=audio.dim, text_dim=text.dim))


MODES: dict[str, FrozenMode] = {"frozen": FrozenMode(), "finetune": FinetuneMode()}


def mode_for(cfg: RunConfig) -> FrozenMode:
    """The mode object of ``cfg.mode``."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r}: expected one of {tuple(MODES)}")
    return MODES[cfg.mode]


# --------------------------------------------------------------------------- shorthands over the mode


def check_store_fits(
    cfg: RunConfig, store: FeatureStore, run: str | os.PathLike | None = None
) -> None:
    """The model's input sizes must equal the store's feature sizes (no silent reshaping).
    In fine-tuning only vision comes from the store (audio and text from the backbones).

    ``run``: the trained run folder the config comes from (evaluate, predict): its sizes
    are fixed, so the message asks for a store of the run's features instead of a
    ``--set`` that would only fit a new training run."""
    for m in mode_for(cfg).store_modalities:
        d = getattr(cfg.model, f"{m}_dim")
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
    """``data.text_tokens`` as yes/no for ``cfg``'s mode and ``store``."""
    return mode_for(cfg).resolve_text_tokens(cfg, store)


def make_dataset(
    cfg: RunConfig,
    store: FeatureStore,
    labels: Labels | None,
    ids: Iterable[str] | None = None,
    *,
    training: bool = False,
):
    """The clips of ``labels`` (or ``ids``) for ``cfg``'s mode (see :meth:`FrozenMode.dataset`)."""
    return mode_for(cfg).dataset(cfg, store, labels, ids, training=training)
