"""Import the authors' released fusion weights as an ``official`` run folder.

The TAEMI release (Zhu et al., arXiv 2603.14976; ``docs/method.md``
sections 4-5) ships its fusion model without the step-1 projections/self-attention:
the cross-attention blocks read the raw features. That is our ``official`` preset
(``model.align=False``), and its parameters map one to one onto the release's:

=====================================================  ==========================  ================
release name (shape)                                   ``official`` model name     shape
=====================================================  ==========================  ================
``ca_audio.q_proj.weight`` (H, D_t)                    ``ca_audio.q_proj.weight``  same
``ca_audio.{k,v}_proj.weight`` (H, D_a)                same name                   same
``ca_audio.out_proj.weight`` (H, H)                    same name                   same
``ca_audio.{q,k,v,out}_proj.bias`` (H,)                same name                   same
``ca_audio.{ln_q,ln_kv}.{weight,bias}`` (H,)           same name                   same
``ca_vision.*`` (as ``ca_audio``, K/V from D_v)        same name                   same
``miss_audio`` (1, 1, D_a)                             ``missing.audio``           (D_a,)
``miss_vision`` (1, 1, D_v)                            ``missing.vision``          (D_v,)
``miss_text`` (1, D_t)                                 ``missing.text``            (D_t,)
``pred_head.0.{weight,bias}`` (H_h, D_t + 2H), (H_h,)  same name                   same
``pred_head.3.{weight,bias}`` (E, H_h), (E,)           same name                   same
=====================================================  ==========================  ================

Sizes are read from the weights: ``H`` = rows of ``ca_audio.q_proj.weight``, ``D_t``
its columns, ``D_a``/``D_v`` the columns of ``ca_{audio,vision}.k_proj.weight``,
``H_h`` = rows of ``pred_head.0.weight``, ``E`` = rows of ``pred_head.3.weight`` (which
must equal the number of emotions). The number of attention heads is NOT stored in
the weights (the heads split the same matrices); it is set to the release's 4
(:data:`RELEASE_HEADS`, docs/method.md section 4). Missing tokens are accepted as
(1, 1, D), (1, D) or (D,). Tensors that are neither fusion nor backbone weights
(optimiser state flattened into the dict, ...) are ignored and listed.

**The fine-tuned backbones.** The release fine-tuned its audio model and the GTE text
encoder end to end (docs/method.md section 6) and saved them in the same state dict, under
its model's attributes ``audio_model`` and ``text_model``:

- ``audio_model.wav2vec2.*`` (HF ``Wav2Vec2Model`` inside audeering's emotion model)
  -> ``audio.model.wav2vec2.*``;
- ``audio_model.classifier.{dense,out_proj}.*`` (its regression head, which TAEMI applies
  per frame: D_a = hidden + 3) -> ``audio.model.classifier.*``;
- ``audio_model.<key>`` of a bare ``Wav2Vec2Model`` (``feature_extractor.*``,
  ``feature_projection.*``, ``encoder.*``, ``masked_spec_embed``; no ``wav2vec2.`` level)
  -> ``audio.model.wav2vec2.<key>`` (the head is then missing: an error);
- ``text_model.*`` (HF ``AutoModel``: GTE / BERT-like, ``embeddings.*``, ``encoder.*``)
  -> ``text.model.*``;
- weight norm saved by torch's old ``weight_norm`` (``...weight_g``/``...weight_v``) ->
  ``...parametrizations.weight.original0/1`` (and back, whichever the model uses);
- the fusion keys (table above) -> ``fusion.<official name>``.

The prefixes may sit under the container keys and prefixes below (``module.`` ...).

With ``models={"audio": DIR, "text": DIR}`` (``taemi import-release ... --model audio=DIR
text=DIR``) :func:`import_release` writes a fine-tuning run (``mode: finetune``): the
backbones are built from the model folders exactly as ``taemi train --mode finetune``
builds them (:meth:`taemi.train.modes.FinetuneMode.build`; the folders' own weights are
loaded, then replaced), and every backbone parameter must come from the checkpoint, with
the folder's shapes. Release keys that the rebuilt architecture legitimately lacks (the
text model's pooler, which :class:`~taemi.backbones.text.TextBackbone` does not build;
``position_ids``/``inv_freq`` buffers older libraries saved) are listed in import.json as
ignored; any other missing or unexpected backbone key is an error naming the checkpoint.
Without ``models`` the backbones are ignored (a warning says how to import them): that run
reads features from the pretrained encoders, which is not the authors' model.

Usage (the command line calls :func:`import_release`)::

    taemi import-release CHECKPOINT --out RUN                       # fusion only (official)
    # the whole model (add --features STORE to record how vision features are made):
    taemi import-release CHECKPOINT --out RUN --model audio=W2V_DIR text=GTE_DIR --trust-remote-code

    from taemi.release import import_release
    import_release("taemi_release.pt", "runs/official_release")
    # RUN/config.yaml, RUN/best.safetensors, RUN/last.safetensors, RUN/import.json
    # (+ RUN/backbones/{audio,text}, and RUN/features.json with features=STORE, when
    # models= is given)

Checkpoints are read with safetensors, or with ``torch.load(..., weights_only=True)``:
a pickle is never allowed to build arbitrary objects. Common containers
(``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``,
``{"module": ...}``) are unwrapped and common prefixes (``module.``, ``model.``,
``fusion.``, ``fusion_model.``, ``_orig_mod.``) stripped when the fusion keys sit
under them.

:func:`export_release_state` is the inverse mapping (our ``official`` model to
release names and shapes); it exists to test the import by a round trip.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from taemi import EMI_EMOTIONS
from taemi.config import ConfigError, RunConfig, apply_override, preset
from taemi.model.taemi import TAEMI
from taemi.run import CONFIG_FILE, FEATURES_FILE, IMPORT_FILE, write_run
from taemi.train.modes import build_model, mode_for

log = logging.getLogger(__name__)

#: Attention heads of the released cross-attention blocks (docs/method.md section 4; not in the weights).
RELEASE_HEADS = 4

#: File suffixes read with ``torch.load(weights_only=True)``; ``.safetensors`` is read with safetensors.
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

#: Container keys unwrapped (in this order) when the fusion keys are not at the top level.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")

#: Key prefixes stripped (in any combination) when the fusion keys appear under them.
STRIP_PREFIXES = ("module.", "model.", "fusion.", "fusion_model.", "_orig_mod.")

#: The roles of ``models=`` (``--model ROLE=DIR``): our fine-tuning model's backbones.
BACKBONE_ROLES = ("audio", "text")

#: Key prefix of each fine-tuned backbone in the release (its model's attributes).
BACKBONE_PREFIXES: dict[str, str] = {"audio": "audio_model.", "text": "text_model."}

#: Top-level modules of a bare HF ``Wav2Vec2Model``: release audio keys starting with one
#: of these (no ``wav2vec2.`` level) are read as that layout (module docstring).
_BARE_WAV2VEC2 = ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed")

#: Release backbone keys the rebuilt architectures legitimately lack (listed as ignored):
#: the text model's pooler (never built, see TextBackbone), and buffers that older
#: transformers versions saved with the weights.
_IGNORABLE_PREFIXES: dict[str, tuple[str, ...]] = {"audio": (), "text": ("pooler.",)}
_IGNORABLE_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", ".inv_freq")

#: Weight-norm parameter names: old ``torch.nn.utils.weight_norm`` -> parametrizations.
_WEIGHT_NORM = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}

_CA_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "ln_q", "ln_kv")
_KV_MODALITIES = ("audio", "vision")
_TOKENS = {
    "miss_audio": "missing.audio",
    "miss_vision": "missing.vision",
    "miss_text": "missing.text",
}
_RELEASE_TOKEN_SHAPES = {
    "miss_audio": (1, 1),
    "miss_vision": (1, 1),
    "miss_text": (1,),
}  # leading dims
_MARKER = "ca_audio.q_proj.weight"  # a key every release fusion state has


def _fusion_keys() -> tuple[str, ...]:
    keys = [
        f"ca_{m}.{part}.{p}"
        for m in _KV_MODALITIES
        for part in _CA_PARTS
        for p in ("weight", "bias")
    ]
    keys += list(_TOKENS)
    keys += [f"pred_head.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")]
    return tuple(keys)


#: Every key the release fusion state must hold (release names).
FUSION_KEYS: tuple[str, ...] = _fusion_keys()


class ReleaseImportError(ValueError):
    """A released checkpoint that cannot be read or does not fit the ``official`` model."""


# --------------------------------------------------------------------------- reading


def read_release_state(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` dict, containers and prefixes removed.

    ``.safetensors`` files are read with safetensors; ``.pt``/``.pth``/``.ckpt``/``.bin``
    with ``torch.load(map_location="cpu", weights_only=True)`` only (a pickle that
    would build other objects is refused). Raises :class:`ReleaseImportError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ReleaseImportError(f"release checkpoint {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:
            raise ReleaseImportError(
                f"release checkpoint {path}: not a readable safetensors file ({type(e).__name__}: {e})"
            ) from e
    elif suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ReleaseImportError(
                f"release checkpoint {path}: cannot be loaded safely with torch.load(weights_only=True) "
                f"({type(e).__name__}: {e}). Only tensors and plain containers are accepted; "
                "arbitrary pickled objects are never unpickled."
            ) from e
    else:
        raise ReleaseImportError(
            f"release checkpoint {path}: unsupported file type {path.suffix!r}; "
            f"expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}"
        )
    return _unwrap(obj, path, where="<top level>")


def _unwrap(obj: Any, path: Path, where: str) -> dict[str, Tensor]:
    """Find the dict level holding the fusion keys; strip their prefix there."""
    if not isinstance(obj, Mapping):
        raise ReleaseImportError(
            f"release checkpoint {path}: {where} is a {type(obj).__name__}, expected a dict of tensors"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    prefix = _fusion_prefix(tensors, path, where)
    if prefix is None:
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                log.debug("%s: unwrapping container key %r", path, key)
                return _unwrap(obj[key], path, where=f"{where}[{key!r}]")
        if not tensors:
            raise ReleaseImportError(
                f"release checkpoint {path}: no tensors at {where} and none of the containers "
                f"{list(CONTAINER_KEYS)} (keys found: {sorted(map(str, obj))[:20]})"
            )
        return tensors  # convert_release_state reports the missing fusion keys
    skipped = sorted(str(k) for k in obj if k not in tensors)
    if skipped:
        log.debug("%s: non-tensor entries at %s skipped: %s", path, where, skipped)
    if not prefix:
        return tensors
    log.debug("%s: stripping prefix %r", path, prefix)
    return {(k.removeprefix(prefix)): v for k, v in tensors.items()}


def _fusion_prefix(tensors: Mapping[str, Tensor], path: Path, where: str) -> str | None:
    """The prefix (made of :data:`STRIP_PREFIXES`) under which the marker key sits, or None."""
    found = []
    for k in tensors:
        if k.endswith(_MARKER) and _is_strippable(k[: -len(_MARKER)]):
            found.append(k[: -len(_MARKER)])
    if len(found) > 1:
        raise ReleaseImportError(
            f"release checkpoint {path}: {where} holds several fusion models "
            f"(prefixes {sorted(found)}); extract the one to import first"
        )
    return found[0] if found else None


def _is_strippable(prefix: str) -> bool:
    while prefix:
        for p in STRIP_PREFIXES:
            if prefix.startswith(p):
                prefix = prefix[len(p) :]
                break
        else:
            return False
    return True


# --------------------------------------------------------------------------- converting


def convert_release_state(
    state: Mapping[str, Tensor],
    *,
    emotions: Sequence[str] = EMI_EMOTIONS,
    source: str | Path = "<state>",
) -> tuple[RunConfig, dict[str, Tensor], list[str]]:
    """Map release fusion weights onto the ``official`` preset.

    Returns ``(cfg, our_state, ignored_keys)``: the ``official`` RunConfig with the
    sizes read from the weights (set through :func:`taemi.config.apply_override`),
    the state dict in our names and shapes (float32), and the sorted non-fusion keys.
    ``source`` only names the checkpoint in error messages.
    Raises :class:`ReleaseImportError` on a missing key or an inconsistent shape.
    """
    missing = [k for k in FUSION_KEYS if k not in state]
    if missing:
        hints = sorted(k for k in state if any(k.endswith("." + m) for m in missing))[:10]
        hint = f"; keys that end like them (unsupported prefix?): {hints}" if hints else ""
        raise ReleaseImportError(
            f"release checkpoint {source}: missing fusion keys {missing}{hint}"
        )
    for k in FUSION_KEYS:
        if not state[k].is_floating_point():
            raise ReleaseImportError(
                f"release checkpoint {source}: {k} has dtype {state[k].dtype}, expected a float"
            )

    def dims(key: str, n: int) -> tuple[int, ...]:
        shape = tuple(state[key].shape)
        if len(shape) != n:
            raise ReleaseImportError(
                f"release checkpoint {source}: {key} has shape {shape}, expected a {n}-d tensor"
            )
        return shape

    hidden, text_dim = dims("ca_audio.q_proj.weight", 2)
    audio_dim = dims("ca_audio.k_proj.weight", 2)[1]
    vision_dim = dims("ca_vision.k_proj.weight", 2)[1]
    head_hidden = dims("pred_head.0.weight", 2)[0]
    num_outputs = dims("pred_head.3.weight", 2)[0]
    if num_outputs != len(emotions):
        raise ReleaseImportError(
            f"release checkpoint {source}: pred_head.3.weight has {num_outputs} output rows but "
            f"{len(emotions)} emotions were given ({list(emotions)})"
        )

    expected = _release_shapes(audio_dim, vision_dim, text_dim, hidden, head_hidden, num_outputs)
    ours: dict[str, Tensor] = {}
    for key, shape in expected.items():
        t = state[key]
        if key in _TOKENS:
            lead = tuple(t.shape[:-1])
            if t.ndim == 0 or t.shape[-1] != shape[-1] or any(d != 1 for d in lead):
                raise ReleaseImportError(
                    f"release checkpoint {source}: {key} has shape {tuple(t.shape)}, expected {shape} "
                    f"(or ({shape[-1]},))"
                )
            ours[_TOKENS[key]] = t.reshape(shape[-1]).float().clone()  # (1, 1, D) -> (D,)
        else:
            if tuple(t.shape) != shape:
                raise ReleaseImportError(
                    f"release checkpoint {source}: {key} has shape {tuple(t.shape)}, expected {shape} "
                    f"(sizes read from ca_audio.q_proj.weight, ca_audio/ca_vision.k_proj.weight and "
                    f"pred_head.0/3.weight: audio {audio_dim}, vision {vision_dim}, text {text_dim}, "
                    f"hidden {hidden}, head hidden {head_hidden}, outputs {num_outputs})"
                )
            ours[key] = t.float().clone()

    cfg = preset("official")
    try:
        for key, value in (
            ("model.audio_dim", audio_dim),
            ("model.vision_dim", vision_dim),
            ("model.text_dim", text_dim),
            ("model.hidden", hidden),
            ("model.heads", RELEASE_HEADS),
            ("model.head_hidden", head_hidden),
            ("data.emotions", tuple(emotions)),
        ):
            apply_override(cfg, key, value)
        cfg.validate()
    except ConfigError as e:
        raise ReleaseImportError(
            f"release checkpoint {source}: the weights give an invalid config: {e}"
        ) from e

    ignored = sorted(k for k in state if k not in expected)
    return cfg, ours, ignored


def _release_shapes(
    audio_dim: int, vision_dim: int, text_dim: int, hidden: int, head_hidden: int, num_outputs: int
) -> dict[str, tuple[int, ...]]:
    """Release key -> shape, for the given sizes (the mapping table of the module docstring)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for m, kv in (("audio", audio_dim), ("vision", vision_dim)):
        for part, in_dim in (
            ("q_proj", text_dim),
            ("k_proj", kv),
            ("v_proj", kv),
            ("out_proj", hidden),
        ):
            shapes[f"ca_{m}.{part}.weight"] = (hidden, in_dim)
            shapes[f"ca_{m}.{part}.bias"] = (hidden,)
        for part in ("ln_q", "ln_kv"):
            shapes[f"ca_{m}.{part}.weight"] = (hidden,)
            shapes[f"ca_{m}.{part}.bias"] = (hidden,)
    shapes["miss_audio"] = (1, 1, audio_dim)
    shapes["miss_vision"] = (1, 1, vision_dim)
    shapes["miss_text"] = (1, text_dim)
    shapes["pred_head.0.weight"] = (head_hidden, text_dim + 2 * hidden)
    shapes["pred_head.0.bias"] = (head_hidden,)
    shapes["pred_head.3.weight"] = (num_outputs, head_hidden)
    shapes["pred_head.3.bias"] = (num_outputs,)
    assert set(shapes) == set(FUSION_KEYS)
    return shapes


# --------------------------------------------------------------------------- the backbones


def backbone_keys(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The release's backbone tensors per role, up to and including their prefix
    (:data:`BACKBONE_PREFIXES`, possibly under :data:`STRIP_PREFIXES` such as ``module.``)
    removed: ``{"audio": {"wav2vec2.encoder...": t}, "text": {"embeddings...": t}}``."""
    out: dict[str, dict[str, Tensor]] = {role: {} for role in BACKBONE_PREFIXES}
    for k, v in state.items():
        found = _backbone_role(k)
        if found is not None:
            out[found[0]][found[1]] = v
    return out


def _backbone_role(key: str) -> tuple[str, str] | None:
    """(role, rest) of a release backbone key, or None for any other key."""
    for role, pre in BACKBONE_PREFIXES.items():
        at = key.find(pre)
        if at >= 0 and _is_strippable(key[:at]):
            return role, key[at + len(pre) :]
    return None


def _our_name(role: str, key: str, target: Mapping[str, Tensor]) -> str:
    """Our backbone-module name (``model.…``) of a release key of ``role`` (prefix removed)."""
    if role == "audio" and key.startswith(_BARE_WAV2VEC2):
        key = "wav2vec2." + key  # a bare Wav2Vec2Model: the emotion model's wav2vec2 part
    name = "model." + key
    head, _, leaf = name.rpartition(".")
    if leaf in _WEIGHT_NORM and name not in target:  # saved with torch's old weight_norm
        name = f"{head}.{_WEIGHT_NORM[leaf]}"
    else:
        for old, new in _WEIGHT_NORM.items():  # saved with parametrizations, built with the old
            if name.endswith("." + new) and name not in target:
                name = name.removesuffix(new) + old
    return name


def convert_backbone_state(
    role: str,
    release: Mapping[str, Tensor],
    backbone: torch.nn.Module,
    *,
    source: str | Path = "<state>",
    model_dir: str | Path = "<model>",
) -> tuple[dict[str, Tensor], list[str]]:
    """Map one backbone's release tensors (``release``: prefix removed, see
    :func:`backbone_keys`) onto ``backbone``'s state dict, strictly.

    Returns ``(ours, ignored)``: every key of ``backbone.state_dict()`` with the release's
    tensor (in the backbone's dtype), and the sorted release keys (with their prefix) that
    the architecture legitimately lacks. Raises :class:`ReleaseImportError` naming
    ``source`` (the checkpoint) and ``model_dir`` (where the architecture came from) on a
    backbone key the checkpoint lacks, an unexpected release key, or a shape that differs.
    """
    prefix = BACKBONE_PREFIXES[role]
    target = backbone.state_dict()
    ours: dict[str, Tensor] = {}
    ignored, unexpected, shapes = [], [], []
    for key, t in release.items():
        name = _our_name(role, key, target)
        if name not in target:
            if key.startswith(_IGNORABLE_PREFIXES[role]) or key.endswith(_IGNORABLE_SUFFIXES):
                ignored.append(prefix + key)
            else:
                unexpected.append(prefix + key)
            continue
        want = target[name]
        if tuple(t.shape) != tuple(want.shape) or t.is_floating_point() != want.is_floating_point():
            shapes.append(
                f"{prefix}{key} {tuple(t.shape)} {t.dtype} vs {tuple(want.shape)} {want.dtype}"
            )
            continue
        ours[name] = t.to(want.dtype).clone()
    _fill_aliases(target, ours)
    missing = sorted(set(target) - set(ours))
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} {role} backbone tensor(s) missing from the checkpoint: "
                f"{[prefix + k.removeprefix('model.') for k in missing[:8]]}"
            )
        if unexpected:
            problems.append(
                f"{len(unexpected)} unexpected {prefix}* key(s), not in the architecture: "
                f"{sorted(unexpected)[:8]}"
            )
        if shapes:
            problems.append(
                f"{len(shapes)} tensor(s) whose shape (or kind) does not fit the architecture "
                f"(checkpoint vs {model_dir}): {shapes[:5]}"
            )
        raise ReleaseImportError(
            f"release checkpoint {source}: its {role} backbone ({prefix}*, {len(release)} tensors) "
            f"does not fit the architecture of --model {role}={model_dir}: "
            + "; ".join(problems)
            + f". The folder must hold the model the authors fine-tuned ({_PAPER_HINT[role]})"
        )
    return ours, sorted(ignored)


def _fill_aliases(target: Mapping[str, Tensor], ours: dict[str, Tensor]) -> None:
    """A module registered twice (TextBackbone's ``layers`` is the model's layer list) gives
    one tensor several state-dict names; the unmapped names get the mapped name's tensor."""

    def ident(t: Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())

    mapped = {ident(target[k]): v for k, v in ours.items() if target[k].numel()}
    for k, t in target.items():
        if k not in ours and t.numel() and ident(t) in mapped:
            ours[k] = mapped[ident(t)]


_PAPER_HINT = {
    "audio": "the paper profile's audeering wav2vec2 emotion model",
    "text": "the paper profile's GTE-en-mlm-base, with --trust-remote-code",
}


def _check_models(models: Mapping[str, Any], source: Path) -> dict[str, Path | str]:
    bad = sorted(set(models) - set(BACKBONE_ROLES))
    lacking = [r for r in BACKBONE_ROLES if r not in models]
    if bad or lacking:
        raise ValueError(
            f"importing the backbones of {source} needs --model audio=DIR text=DIR"
            + (f"; unknown role(s) {bad}" if bad else "")
            + (f"; missing role(s) {lacking}" if lacking else "")
            + f" (roles: {', '.join(BACKBONE_ROLES)})"
        )
    return {r: models[r] for r in BACKBONE_ROLES}


def _finetune_config(
    cfg: RunConfig, models: Mapping[str, Any], *, trust_remote_code: bool, allow_download: bool
) -> RunConfig:
    """The ``official`` config of the fusion weights as a fine-tuning run over ``models``."""
    for key, value in (
        ("mode", "finetune"),
        ("finetune.audio_backbone", str(models["audio"])),
        ("finetune.text_backbone", str(models["text"])),
        ("finetune.trust_remote_code", trust_remote_code),
        ("finetune.allow_download", allow_download),
        ("data.text_tokens", "no"),  # what FinetuneMode.resolve_text_tokens sets in training
    ):
        apply_override(cfg, key, value)
    cfg.validate()
    return cfg


def _build_finetune_model(
    cfg: RunConfig, models: Mapping[str, Any], source: Path
) -> tuple[RunConfig, Any]:
    """Backbones from the model folders + the fusion model, as ``taemi train --mode
    finetune`` builds them; the backbones' sizes must be the fusion weights'."""
    mode = mode_for(cfg)
    built_cfg, model = mode.build(cfg)  # loads the folders' weights (replaced below)
    for role in ("audio", "text"):
        want, got = getattr(cfg.model, f"{role}_dim"), getattr(built_cfg.model, f"{role}_dim")
        if want != got:
            what = (
                "ca_audio.k_proj.weight columns"
                if role == "audio"
                else "ca_audio.q_proj.weight columns"
            )
            raise ReleaseImportError(
                f"release checkpoint {source}: its fusion model reads {role} features of size {want} "
                f"({what}) but the {role} backbone of --model {role}={models[role]} gives {got}: "
                f"the folder is not the model the authors fine-tuned ({_PAPER_HINT[role]})"
            )
    return built_cfg, model


# --------------------------------------------------------------------------- importing


def import_release(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    emotions: Sequence[str] = EMI_EMOTIONS,
    models: Mapping[str, str | Path] | None = None,
    features: str | Path | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
) -> Path:
    """Read, convert and write a released checkpoint as a run folder; returns ``out_dir``.

    Without ``models``: the fusion weights as an ``official`` run (``mode: frozen``); the
    checkpoint's backbone tensors are ignored, with a warning. With ``models={"audio":
    DIR, "text": DIR}``: the whole model as a fine-tuning run (``mode: finetune``; module
    docstring): backbones built from the folders as training builds them
    (``trust_remote_code``/``allow_download`` as ``finetune.*`` says), every backbone and
    fusion tensor from the checkpoint, and ``RUN/backbones/{audio,text}``.
    ``features`` (with ``models`` only): a feature store extracted the way the release's
    vision features were (e.g. ``taemi extract --profile paper``); its record becomes
    ``RUN/features.json``, so ``taemi predict --run RUN MEDIA`` extracts vision the same
    way without ``--profile``. Without it, predicting from media needs ``--profile paper``.

    Writes ``config.yaml``, ``best.safetensors`` and ``last.safetensors`` (same weights)
    via :func:`taemi.run.write_run`, and ``import.json`` (source path, sha256 of the
    checkpoint file, the ignored keys; with ``models`` also the tensors mapped per part
    and the backbone keys ignored). Nothing is written unless the whole import succeeds;
    an existing run folder (one that already holds ``config.yaml``) is never overwritten.
    """
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    if models is not None:
        models = _check_models(models, checkpoint)
    elif features is not None:
        raise ValueError(
            "features= (--features) describes a fine-tuning run's inputs: it needs models= "
            "(--model audio=DIR text=DIR)"
        )
    if (out_dir / CONFIG_FILE).exists():
        raise FileExistsError(
            f"{out_dir} already holds a run ({CONFIG_FILE}); choose another --out folder"
        )
    state = read_release_state(checkpoint)
    backbones = backbone_keys(state)
    fusion_state = {k: v for k, v in state.items() if _backbone_role(k) is None}
    cfg, ours, ignored = convert_release_state(fusion_state, emotions=emotions, source=checkpoint)
    if models is None:
        return _import_fusion(
            checkpoint,
            out_dir,
            cfg,
            ours,
            sorted([*ignored, *(k for k in state if k not in fusion_state)]),
            backbones,
        )
    return _import_whole(
        checkpoint,
        out_dir,
        cfg,
        ours,
        ignored,
        backbones,
        models,
        features=features,
        trust_remote_code=trust_remote_code,
        allow_download=allow_download,
    )


def _import_fusion(
    checkpoint: Path,
    out_dir: Path,
    cfg: RunConfig,
    ours: dict[str, Tensor],
    ignored: list[str],
    backbones: Mapping[str, Mapping[str, Tensor]],
) -> Path:
    """The fusion weights as an ``official`` run; the backbones ignored (with a warning)."""
    counts = {BACKBONE_PREFIXES[r] + "*": len(k) for r, k in backbones.items() if k}
    if counts:
        log.warning(
            "%s holds fine-tuned backbone weights (%s tensors) that this fusion-only import "
            "ignores: the run expects features of the PRETRAINED encoders, which is not the "
            "authors' model. Import them too with --model audio=DIR text=DIR (the paper "
            "profile's wav2vec2 emotion and GTE folders; python: models={'audio': DIR, "
            "'text': DIR})",
            checkpoint,
            ", ".join(f"{p}: {n}" for p, n in counts.items()),
        )
    model = build_model(cfg)
    _check_mapping(model.state_dict(), ours)
    model.load_state_dict(ours, strict=True)
    write_run(out_dir, cfg, model)
    info = {
        "source": str(checkpoint),
        "sha256": _sha256(checkpoint),
        "ignored_keys": len(ignored),
        "ignored_examples": ignored[:10],
    }
    (out_dir / IMPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("imported %s into %s (%d non-fusion keys ignored)", checkpoint, out_dir, len(ignored))
    return out_dir


def _import_whole(
    checkpoint: Path,
    out_dir: Path,
    cfg: RunConfig,
    fusion: dict[str, Tensor],
    ignored: list[str],
    backbones: Mapping[str, Mapping[str, Tensor]],
    models: Mapping[str, Any],
    *,
    features: str | Path | None,
    trust_remote_code: bool,
    allow_download: bool,
) -> Path:
    """Backbones + fusion as a ``mode: finetune`` run (see :func:`import_release`)."""
    from taemi.run import write_features_record
    from taemi.store import FeatureStore

    empty = [r for r in BACKBONE_ROLES if not backbones[r]]
    if empty:
        raise ReleaseImportError(
            f"release checkpoint {checkpoint} holds no "
            f"{' or '.join(BACKBONE_PREFIXES[r] + '*' for r in empty)} tensors: it has no "
            f"fine-tuned {' and '.join(empty)} backbone to import; drop --model for a fusion-only "
            "import"
        )
    try:
        cfg = _finetune_config(
            cfg, models, trust_remote_code=trust_remote_code, allow_download=allow_download
        )
    except ConfigError as e:
        raise ReleaseImportError(f"release checkpoint {checkpoint}: {e}") from e
    cfg, model = _build_finetune_model(cfg, models, checkpoint)
    mode = mode_for(cfg)
    state: dict[str, Tensor] = {f"fusion.{k}": v for k, v in fusion.items()}
    ignored_backbone: list[str] = []
    mapped = {"fusion": len(fusion)}
    for role in BACKBONE_ROLES:
        ours, skipped = convert_backbone_state(
            role, backbones[role], getattr(model, role), source=checkpoint, model_dir=models[role]
        )
        state.update({f"{role}.{k}": v for k, v in ours.items()})
        ignored_backbone += skipped
        mapped[role] = len(backbones[role]) - len(skipped)  # release tensors used
    _check_mapping(model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    record = None
    if features is not None:
        store = FeatureStore(features)
        if store.dims["vision"] != cfg.model.vision_dim:
            raise ReleaseImportError(
                f"release checkpoint {checkpoint}: its fusion model reads vision features of size "
                f"{cfg.model.vision_dim} (ca_vision.k_proj.weight columns) but the feature store "
                f"{features} (--features) has size {store.dims['vision']}: use a store extracted "
                "as the release's vision features were (taemi extract --profile paper)"
            )
        record = mode.features(store, model)
    write_run(out_dir, cfg, model.eval())
    mode.save_architecture(model, out_dir)
    if record is not None:
        write_features_record(out_dir, record)
    info = {
        "source": str(checkpoint),
        "sha256": _sha256(checkpoint),
        "mode": "finetune",
        "models": {r: str(models[r]) for r in BACKBONE_ROLES},
        "features": None if features is None else str(features),
        "mapped": mapped,
        "ignored_backbone_keys": ignored_backbone,
        "ignored_keys": len(ignored),
        "ignored_examples": ignored[:10],
    }
    (out_dir / IMPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info(
        "imported %s into %s as a fine-tuning run (tensors: %s; %d backbone keys without a "
        "place in the architecture and %d other keys ignored)%s",
        checkpoint,
        out_dir,
        ", ".join(f"{k} {v}" for k, v in mapped.items()),
        len(ignored_backbone),
        len(ignored),
        ""
        if record is not None
        else f"; no {FEATURES_FILE}: predict from media with --profile paper",
    )
    return out_dir


def _check_mapping(expected: Mapping[str, Tensor], ours: Mapping[str, Tensor]) -> None:
    """The mapping must cover the model exactly: a mismatch is a bug here, not in the file."""
    if set(expected) != set(ours):
        raise RuntimeError(
            f"release mapping does not fit the model: model-only keys {sorted(set(expected) - set(ours))[:10]}, "
            f"mapped-only keys {sorted(set(ours) - set(expected))[:10]}"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- exporting


def export_release_state(model: TAEMI) -> dict[str, Tensor]:
    """The inverse mapping: an ``official``-architecture model's weights in release names/shapes.

    Used to test :func:`import_release` by a round trip. Raises ``ValueError`` for a
    model the release format cannot hold (another architecture, or heads != 4).
    """
    cfg = model.cfg
    if not (
        cfg.fusion == "cross_attention"
        and not cfg.align
        and cfg.anchor == "text"
        and cfg.missing_tokens == "learned"
    ):
        raise ValueError(
            "only the official architecture (fusion=cross_attention, align=False, anchor=text, "
            f"missing_tokens=learned) has a release layout; got fusion={cfg.fusion!r}, align={cfg.align}, "
            f"anchor={cfg.anchor!r}, missing_tokens={cfg.missing_tokens!r}"
        )
    if cfg.heads != RELEASE_HEADS:
        raise ValueError(
            f"the release format implies {RELEASE_HEADS} heads; model has heads={cfg.heads}"
        )
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    for release_key, our_key in _TOKENS.items():
        lead = _RELEASE_TOKEN_SHAPES[release_key]
        out[release_key] = state.pop(our_key).reshape(*lead, -1)  # (D,) -> (1, 1, D) or (1, D)
    out.update(state)
    unknown = sorted(set(out) - set(FUSION_KEYS))
    if unknown:
        raise ValueError(f"model keys with no release name: {unknown}")
    return out
