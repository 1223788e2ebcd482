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
(:data:`RELEASE_HEADS`, docs/method.md section 4). Every other tensor of the checkpoint (the
fine-tuned audio/text backbones, optimiser state flattened into the dict, ...) is
ignored and listed. Missing tokens are accepted as (1, 1, D), (1, D) or (D,).

Usage (the command line calls :func:`import_release`)::

    taemi import-release CHECKPOINT --out RUN

    from taemi.release import import_release
    import_release("taemi_release.pt", "runs/official_release")
    # RUN/config.yaml, RUN/best.safetensors, RUN/last.safetensors, RUN/import.json

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
from taemi.run import CONFIG_FILE, IMPORT_FILE, write_run
from taemi.train.modes import build_model

log = logging.getLogger(__name__)

#: Attention heads of the released cross-attention blocks (docs/method.md section 4; not in the weights).
RELEASE_HEADS = 4

#: File suffixes read with ``torch.load(weights_only=True)``; ``.safetensors`` is read with safetensors.
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

#: Container keys unwrapped (in this order) when the fusion keys are not at the top level.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")

#: Key prefixes stripped (in any combination) when the fusion keys appear under them.
STRIP_PREFIXES = ("module.", "model.", "fusion.", "fusion_model.", "_orig_mod.")

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


# --------------------------------------------------------------------------- importing


def import_release(
    checkpoint: str | Path, out_dir: str | Path, *, emotions: Sequence[str] = EMI_EMOTIONS
) -> Path:
    """Read, convert and write a released checkpoint as a run folder; returns ``out_dir``.

    Writes ``config.yaml``, ``best.safetensors`` and ``last.safetensors`` (same weights)
    via :func:`taemi.run.write_run`, and ``import.json`` (source path,
    sha256 of the checkpoint file, number and first 10 of the ignored keys). Refuses
    to overwrite an existing run folder (one that already holds ``config.yaml``).
    """
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    if (out_dir / CONFIG_FILE).exists():
        raise FileExistsError(
            f"{out_dir} already holds a run ({CONFIG_FILE}); choose another --out folder"
        )
    state = read_release_state(checkpoint)
    cfg, ours, ignored = convert_release_state(state, emotions=emotions, source=checkpoint)
    model = build_model(cfg)
    expected = model.state_dict()
    if set(expected) != set(
        ours
    ):  # the mapping and the official model disagree: a bug here, not in the file
        raise RuntimeError(
            f"release mapping does not fit the official model: model-only keys {sorted(set(expected) - set(ours))}, "
            f"mapped-only keys {sorted(set(ours) - set(expected))}"
        )
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
