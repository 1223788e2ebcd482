"""Typed configuration: one dataclass per component, named presets, dotted overrides.

A run is fully described by a :class:`RunConfig`. Presets (``paper``, ``official`` and
the paper's ablation variants) are plain :class:`RunConfig` instances built by
functions in :data:`PRESETS`; the command line refines them with ``--set key=value``
(``--set model.hidden=256 --set train.lr=3e-4``). An unknown key or a value of the
wrong type is an error, never ignored. Every run writes its resolved config as YAML.

Sources for the defaults: docs/method.md sections 3-6 (Zhu et al., arXiv 2603.14976, and the
authors' release).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from taemi import EMI_EMOTIONS

FUSIONS = ("cross_attention", "self_attention", "concat")
ANCHORS = ("audio", "vision", "text")
MISSING_TOKENS = ("learned", "zeros")


class ConfigError(ValueError):
    """A configuration key, value or file that cannot be used."""


def _finite(key: str, value: Any, rule: str = "") -> None:
    """Refuse a NaN/Inf number, or one that breaks ``rule`` (``> 0``, ``>= 0``), named by key.

    Non-finite values enter through ``--set train.lr=inf`` or YAML's ``.inf``/``.nan``; a
    NaN passes every ``<``/``>`` test, so each number is checked here, where the config is
    built, rather than surfacing an epoch later as NaN predictions."""
    ok = math.isfinite(value)
    if ok and rule == "> 0":
        ok = value > 0
    elif ok and rule == ">= 0":
        ok = value >= 0
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be finite{f' and {rule}' if rule else ''}")


def _at_least(key: str, value: int, low: int) -> None:
    """An integer setting (a length, a batch size, a count) must be ``>= low``."""
    if value < low:
        raise ConfigError(f"{key}={value!r}: must be {'> 0' if low == 1 else f'>= {low}'}")


@dataclass
class ModelConfig:
    """The fusion model (docs/method.md section 4)."""

    audio_dim: int = 1027  # D_a: wav2vec2-large hidden (1024) + 3 per-frame regression outputs
    vision_dim: int = 768  # D_v: ViT-B/16 token-mean per frame
    text_dim: int = 768  # D_t: GTE-base CLS vector (and token states)
    hidden: int = 512  # H: shared hidden size of projections and attention
    heads: int = 4  # attention heads in every attention block
    fusion: str = "cross_attention"  # cross_attention | self_attention (pool after SA) | concat (pool after projection)
    align: bool = True  # cross_attention only: project + self-attend each K/V modality first (paper); False = CA on raw dims (release)
    anchor: str = "text"  # query modality of the cross-attention: text | audio | vision
    missing_tokens: str = (
        "learned"  # learned (N(0, 0.02^2) parameters) | zeros (fixed zero vectors)
    )
    token_init_std: float = 0.02  # std of the learned missing-token initialisation
    modality_dropout: float = (
        0.1  # training-time probability of replacing each modality of each sample by its token
    )
    attn_dropout: float = 0.1  # dropout on attention weights
    sa_ffn: int = 2048  # feed-forward width of the intra-modal self-attention layer
    sa_dropout: float = 0.1  # residual dropout inside the self-attention layer
    head_hidden: int = 512  # width of the prediction head's hidden layer
    head_dropout: float = 0.1  # dropout between the head's two linear layers

    def validate(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError(f"model.fusion={self.fusion!r}: expected one of {FUSIONS}")
        if self.anchor not in ANCHORS:
            raise ConfigError(f"model.anchor={self.anchor!r}: expected one of {ANCHORS}")
        if self.missing_tokens not in MISSING_TOKENS:
            raise ConfigError(
                f"model.missing_tokens={self.missing_tokens!r}: expected one of {MISSING_TOKENS}"
            )
        if self.hidden % self.heads:
            raise ConfigError(
                f"model.hidden={self.hidden} is not divisible by model.heads={self.heads}"
            )
        if self.fusion != "cross_attention" and not self.align:
            raise ConfigError(
                f"model.align=False only applies to fusion='cross_attention', got fusion={self.fusion!r}"
            )
        for name in ("modality_dropout", "attn_dropout", "sa_dropout", "head_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{name}={p}: must be in [0, 1)")
        for name in (
            "audio_dim",
            "vision_dim",
            "text_dim",
            "hidden",
            "heads",
            "sa_ffn",
            "head_hidden",
        ):
            _at_least(f"model.{name}", getattr(self, name), 1)
        _finite("model.token_init_std", self.token_init_std, ">= 0")


@dataclass
class DataConfig:
    """How clips become batches."""

    emotions: tuple[str, ...] = EMI_EMOTIONS  # label columns, in output order
    id_column: str = "Filename"  # label-file column holding the clip id
    max_audio_len: int = 599  # frames kept per clip (first ones): 12 s at ~50 frames/s
    max_vision_len: int = 400  # face frames kept per clip (first ones, as released)
    max_text_tokens: int = 128  # text token states kept per clip (when used)
    text_tokens: str = (
        "auto"  # use the store's text token states as K/V (non-text anchors): auto | yes | no
    )
    modalities: tuple[str, ...] = (
        "audio",
        "vision",
        "text",
    )  # what the model may see; others are always missing
    num_workers: int = 0  # DataLoader worker processes
    batching: str = "random"  # random (the recipe: shuffled batches) | bucket (clips of similar lengths share a batch: little padding, faster)
    length_quantum: int = 0  # pad sequence lengths up to a multiple of this (a finite set of shapes); 0 = auto: 32 on CUDA, 1 elsewhere
    resident: str = "auto"  # hold the splits' features in device memory, batches built there: auto (CUDA, when they fit) | yes | no
    resident_share: float = 0.5  # the share of free device memory the resident features may take

    def validate(self) -> None:
        for name in ("max_audio_len", "max_vision_len", "max_text_tokens"):
            _at_least(f"data.{name}", getattr(self, name), 1)
        _at_least("data.num_workers", self.num_workers, 0)
        _at_least("data.length_quantum", self.length_quantum, 0)
        if self.resident not in ("auto", "yes", "no"):
            raise ConfigError(f"data.resident={self.resident!r}: expected auto|yes|no")
        _finite("data.resident_share", self.resident_share, "> 0")
        if self.resident_share > 1:
            raise ConfigError(f"data.resident_share={self.resident_share}: must be in (0, 1]")
        if not self.emotions or len(set(self.emotions)) != len(self.emotions):
            raise ConfigError(f"data.emotions={list(self.emotions)}: need distinct names")
        if not self.modalities or not set(self.modalities) <= set(ANCHORS):
            raise ConfigError(
                f"data.modalities={list(self.modalities)}: a non-empty subset of {ANCHORS}"
            )
        if self.batching not in ("random", "bucket"):
            raise ConfigError(f"data.batching={self.batching!r}: expected random|bucket")
        if self.text_tokens not in ("auto", "yes", "no"):
            raise ConfigError(f"data.text_tokens={self.text_tokens!r}: expected auto|yes|no")


@dataclass
class TrainConfig:
    """Optimisation recipe (docs/method.md section 6)."""

    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    batch_size: int = 32  # clips per optimiser step
    max_epochs: int = 50  # the cosine schedule spans all of them
    warmup_epochs: float = 1.0  # linear warm-up length, in epochs (stepped per optimiser step)
    grad_clip: float = 100.0  # clipping threshold; 0 disables
    grad_clip_mode: str = "value"  # value (release: clip_grad_value_) | norm
    patience: int = 5  # early stopping: epochs without a better valid mean Pearson
    seed: int = 3407  # release seed
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed cuDNN
    precision: str = "auto"  # auto (CUDA: bf16 where the GPU has it, Ampere on, else fp16 + grad scaling; CPU: bf16 with native bf16, else fp32) | fp32 | fp16 | bf16
    cuda_graphs: str = "auto"  # capture the whole training step in CUDA graphs, one per batch shape: auto (CUDA, frozen features, one process, no gradient accumulation; fp16 with its grad scaler captured too) | on | off
    graph_shapes: int = 96  # at most this many batch shapes get a graph; the others run eagerly
    precast_weights: bool = True  # bf16/fp16 on stored features in one process: cast the weights once per step, not at each use (taemi.train.precast)
    compile: bool = False  # torch.compile the model (dynamic shapes; with captured steps, their forward and backward); pays for the official preset on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 64  # clips per evaluation forward pass
    log_every: int = 0  # log the running train loss every N steps (0: per epoch only)
    grad_accum_steps: int = 1  # micro-batches per optimiser step (batch_size is the micro-batch)
    tensorboard: str = "auto"  # TensorBoard event files in RUN/tensorboard/: auto (when the package is installed) | on | off
    mlflow_uri: str = ""  # MLflow tracking URI (empty: off; needs `pip install mlflow`)
    mlflow_experiment: str = "taemi"  # the MLflow experiment the runs are logged under

    def validate(self) -> None:
        if self.grad_clip_mode not in ("value", "norm"):
            raise ConfigError(
                f"train.grad_clip_mode={self.grad_clip_mode!r}: expected 'value' or 'norm'"
            )
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"train.precision={self.precision!r}: expected auto|fp32|fp16|bf16")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ConfigError(f"train.cuda_graphs={self.cuda_graphs!r}: expected auto|on|off")
        if self.tensorboard not in ("auto", "on", "off"):
            raise ConfigError(f"train.tensorboard={self.tensorboard!r}: expected auto|on|off")
        if self.mlflow_uri.strip() and not self.mlflow_experiment.strip():
            raise ConfigError(
                f"train.mlflow_experiment is empty: name the MLflow experiment for train.mlflow_uri={self.mlflow_uri!r}"
            )
        _finite("train.lr", self.lr, "> 0")
        _finite("train.weight_decay", self.weight_decay, ">= 0")
        _finite("train.warmup_epochs", self.warmup_epochs, ">= 0")
        _finite("train.grad_clip", self.grad_clip, ">= 0")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:  # NaN fails this too
                raise ConfigError(
                    f"train.betas={list(self.betas)}: beta{i + 1}={beta!r} must be in [0, 1)"
                )
        for name in ("batch_size", "max_epochs", "eval_batch_size", "grad_accum_steps"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        for name in ("patience", "log_every", "graph_shapes"):
            _at_least(f"train.{name}", getattr(self, name), 0)


MODES = ("frozen", "finetune")
NOISE_COLORS = ("white", "pink", "random")


@dataclass
class AugmentConfig:
    """Waveform augmentation while fine-tuning (:mod:`taemi.data.augment`); all off by default.

    Each operation is applied to a training clip with its own probability; every random
    draw depends only on (seed, epoch, clip), never on worker processes or batch order.
    """

    seed: int = 0  # augmentation seed (combined with the epoch and the clip's position)
    noise_prob: float = 0.0  # probability of additive white noise
    noise_snr_db: tuple[float, float] = (
        10.0,
        30.0,
    )  # SNR range of the noise, dB against the clip's own power
    noise_color: str = "white"  # white | pink | random (either, equally likely, per application)
    stretch_prob: float = 0.0  # probability of a time-stretch (tempo changes, pitch does not)
    stretch_max: float = 0.1  # stretch rate drawn from [1 - s, 1 + s]
    pitch_prob: float = 0.0  # probability of a pitch shift (duration kept)
    pitch_semitones: float = 2.0  # pitch shift drawn from [-k, +k] semitones
    shift_prob: float = 0.0  # probability of a time shift (zero fill, length kept)
    shift_seconds: float = 0.5  # shift drawn from [-t, +t] seconds

    @property
    def enabled(self) -> bool:
        return any(
            getattr(self, p) > 0 for p in ("noise_prob", "stretch_prob", "pitch_prob", "shift_prob")
        )

    def validate(self) -> None:
        def number(name: str, value: Any) -> float:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(f"finetune.augment.{name}={value!r}: must be a finite number")
            return float(value)

        for name in ("noise_prob", "stretch_prob", "pitch_prob", "shift_prob"):
            if not 0.0 <= number(name, getattr(self, name)) <= 1.0:
                raise ConfigError(
                    f"finetune.augment.{name}={getattr(self, name)}: must be in [0, 1]"
                )
        snr = self.noise_snr_db
        if not isinstance(snr, (tuple, list)) or len(snr) != 2:
            raise ConfigError(f"finetune.augment.noise_snr_db={snr!r}: expected [min, max] in dB")
        if number("noise_snr_db", snr[0]) > number("noise_snr_db", snr[1]):
            raise ConfigError(f"finetune.augment.noise_snr_db={list(snr)}: min above max")
        if self.noise_color not in NOISE_COLORS:
            raise ConfigError(
                f"finetune.augment.noise_color={self.noise_color!r}: expected one of {NOISE_COLORS}"
            )
        if not 0.0 <= number("stretch_max", self.stretch_max) < 0.5:
            raise ConfigError(
                f"finetune.augment.stretch_max={self.stretch_max}: must be in [0, 0.5)"
            )
        if not 0.0 <= number("pitch_semitones", self.pitch_semitones) <= 12.0:
            raise ConfigError(
                f"finetune.augment.pitch_semitones={self.pitch_semitones}: must be in [0, 12]"
            )
        if number("shift_seconds", self.shift_seconds) < 0:
            raise ConfigError(f"finetune.augment.shift_seconds={self.shift_seconds}: must be >= 0")


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning of the audio and text backbones (``mode: finetune``; docs/method.md
    sections 3 and 6: the authors fine-tuned wav2vec2 on raw audio and GTE on transcripts
    jointly with the fusion model, vision features pre-extracted).

    The backbones decide ``model.audio_dim`` and ``model.text_dim`` (their output sizes;
    the change is logged and lands in ``RUN/config.yaml``); ``model.vision_dim`` must fit
    the store, as in frozen mode."""

    audio_backbone: str = "offline"  # offline (packaged Whisper tiny.en) | paper (audeering wav2vec2) | hub id | local dir
    text_backbone: str = (
        "offline"  # offline (packaged all-MiniLM-L6-v2) | paper (GTE-base) | hub id | local dir
    )
    audio_window: str = "clip"  # Whisper backbones: clip (pad to max_audio_seconds) | full (30 s, as frozen extraction)
    max_audio_seconds: float = 12.0  # audio kept per clip (docs/method.md section 3: first 12 s)
    text_pooling: str = (
        "auto"  # cls | mean | auto (a sentence-transformers folder's own pooling, else CLS)
    )
    max_text_tokens: int = 128  # transcript tokens kept (special tokens included)
    trust_remote_code: bool = (
        False  # allow model code shipped with a backbone (GTE's "new" architecture)
    )
    allow_download: bool = (
        False  # let Hugging Face download backbones (off: local files / caches only)
    )
    backbone_lr: float = (
        1e-4  # peak learning rate of both backbones (release: 1e-4, as the fusion model)
    )
    backbone_weight_decay: float = 0.01  # AdamW weight decay of the backbones
    freeze_feature_encoder: bool = (
        True  # keep the audio CNN feature encoder (and Whisper's convs) fixed
    )
    freeze_audio_layers: int = 0  # also freeze the first N transformer layers of the audio backbone
    freeze_text_layers: int = 0  # freeze the text embeddings and the first N transformer layers
    gradient_checkpointing: bool = (
        False  # recompute backbone activations in backward (less memory, ~30% slower)
    )
    augment: AugmentConfig = field(
        default_factory=AugmentConfig
    )  # waveform augmentation while training

    def validate(self) -> None:
        if self.audio_window not in ("clip", "full"):
            raise ConfigError(
                f"finetune.audio_window={self.audio_window!r}: expected 'clip' or 'full'"
            )
        if self.text_pooling not in ("auto", "cls", "mean"):
            raise ConfigError(
                f"finetune.text_pooling={self.text_pooling!r}: expected auto|cls|mean"
            )
        if not 0 < self.max_audio_seconds <= 30:
            raise ConfigError(
                f"finetune.max_audio_seconds={self.max_audio_seconds}: must be in (0, 30]"
            )
        if self.max_text_tokens < 2:
            raise ConfigError(f"finetune.max_text_tokens={self.max_text_tokens}: must be >= 2")
        _finite("finetune.backbone_lr", self.backbone_lr, ">= 0")
        _finite("finetune.backbone_weight_decay", self.backbone_weight_decay, ">= 0")
        _at_least("finetune.freeze_audio_layers", self.freeze_audio_layers, 0)
        _at_least("finetune.freeze_text_layers", self.freeze_text_layers, 0)
        for name in ("audio_backbone", "text_backbone"):
            if not getattr(self, name).strip():
                raise ConfigError(
                    f"finetune.{name} is empty: give offline, paper, a hub id or a local folder"
                )
        self.augment.validate()


@dataclass
class RunConfig:
    """Everything a training run needs, written to ``RUN/config.yaml``."""

    preset: str = "paper"  # the preset this config started from (informational)
    mode: str = "frozen"  # frozen (train on the feature store) | finetune (audio/text backbones trained end to end)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # used when mode=finetune

    def validate(self) -> RunConfig:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: expected one of {MODES}")
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.finetune.validate()
        if self.mode == "finetune" and self.data.text_tokens == "yes":
            raise ConfigError(
                "data.text_tokens=yes does not apply to mode=finetune (the text backbone gives one vector)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------- presets


def _paper() -> RunConfig:
    return RunConfig(preset="paper")


def _official() -> RunConfig:
    cfg = RunConfig(preset="official")
    cfg.model.align = False
    return cfg


def _variant(name: str, **model_kw: Any) -> RunConfig:
    cfg = RunConfig(preset=name)
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    return cfg


#: Named presets: the paper's model, the authors' release, and the paper's ablations
#: (Table 3: leave one out; Table 4: anchor modality).
PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    "paper": _paper,
    "official": _official,
    "concat": lambda: _variant("concat", fusion="concat"),
    "self_attention": lambda: _variant("self_attention", fusion="self_attention"),
    "zeros_tokens": lambda: _variant("zeros_tokens", missing_tokens="zeros"),
    "no_modality_dropout": lambda: _variant("no_modality_dropout", modality_dropout=0.0),
    "anchor_audio": lambda: _variant("anchor_audio", anchor="audio"),
    "anchor_vision": lambda: _variant("anchor_vision", anchor="vision"),
}


def preset(name: str) -> RunConfig:
    """Return a fresh copy of the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------- overrides


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the command line, or a YAML scalar) to ``tp``."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            items = [s.strip() for s in value.split(",")] if value.strip() else []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{key}: expected a comma-separated list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(items)} ({value!r})")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 10)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _field_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in fields(obj)}


def apply_override(cfg: RunConfig, key: str, value: Any) -> None:
    """Set the dotted ``key`` (``model.hidden``) of ``cfg`` to ``value``, type-checked."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        types_ = _field_types(obj)
        if part not in types_:
            where = ".".join(parts[:i]) or "the run config"
            raise ConfigError(
                f"unknown config key {key!r}: {where} has no field {part!r} "
                f"(fields: {', '.join(types_)})"
            )
        if i == len(parts) - 1:
            tp = types_[part]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"config key {key!r} is a section; set one of its fields")
            setattr(obj, part, _coerce(value, tp, key))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(
                    f"config key {key!r}: {'.'.join(parts[: i + 1])} is not a section"
                )


def flat_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict (e.g. ``cfg.to_dict()``) as ``{"train.lr": 1e-4, ...}``: dotted keys, the
    override syntax; a non-dict ``d`` is ``{prefix: d}``."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flat_dict(v, key) if isinstance(v, dict) else {key: v})
    return out


def parse_overrides(items: typing.Iterable[str]) -> list[tuple[str, str]]:
    """Split ``key=value`` strings from the command line."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def from_dict(data: dict[str, Any], *, base: RunConfig | None = None) -> RunConfig:
    """Build a config from a nested mapping (a loaded YAML file); unknown keys are errors."""
    cfg = base if base is not None else RunConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")

    def walk(prefix: str, mapping: dict[str, Any]) -> None:
        for k, v in mapping.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            else:
                apply_override(cfg, key, v)

    walk("", data)
    return cfg.validate()


def build_config(
    preset_name: str = "paper",
    overrides: typing.Iterable[tuple[str, Any]] = (),
    config_file: str | Path | None = None,
) -> RunConfig:
    """Preset, then an optional YAML file, then ``--set`` overrides; validated."""
    cfg = preset(preset_name)
    if config_file is not None:
        cfg = _from_file(config_file, cfg)
    for k, v in overrides:
        apply_override(cfg, k, v)
    return cfg.validate()


def input_dim_overrides(
    dims: dict[str, int],
    overrides: typing.Iterable[tuple[str, Any]] = (),
    config_file: str | Path | None = None,
) -> list[tuple[str, int]]:
    """``model.<modality>_dim`` overrides that make the model's input sizes those of a
    feature store (``dims``: modality -> size), except the sizes the user set in
    ``overrides`` or in the ``model`` section of ``config_file``."""
    given = {k for k, _ in overrides}
    if config_file is not None:
        section = load_yaml(config_file).get(
            "model"
        )  # a non-mapping section is refused by build_config
        given |= {f"model.{k}" for k in (section if isinstance(section, dict) else {})}
    return [(f"model.{m}_dim", d) for m, d in dims.items() if f"model.{m}_dim" not in given]


def _from_file(path: str | Path, base: RunConfig) -> RunConfig:
    """:func:`from_dict` over a YAML file; its errors name the file."""
    data = load_yaml(path)
    try:
        return from_dict(data, base=base)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def _strict_loader() -> type:
    """A YAML SafeLoader that refuses a key repeated in one mapping (plain YAML keeps
    the last value silently, so ``lr: 1e-4`` ... ``lr: 1e-3`` would train with 1e-3)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are allowed
                continue
            key = loader.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ConfigError(
                        f"duplicate key {key!r} at line {line} (first at line {seen[key]}); "
                        "a key may appear once per section"
                    )
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def _yaml_problem(e: Exception) -> str:
    """A YAML error on one line: what and where (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (empty file: ``{}``); a file that cannot be read,
    is not YAML, repeats a key or is not a mapping at the top is a :class:`ConfigError`
    naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_strict_loader())  # a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: the top level must be a mapping of settings (model:, data:, train:, ...), "
            f"got a {type(data).__name__}"
        )
    return data


def save_config(cfg: RunConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def load_config(path: str | Path) -> RunConfig:
    """Load a resolved run config (``RUN/config.yaml``) strictly; errors name the file."""
    return _from_file(path, RunConfig())


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x
