"""Import the ABAW EMI organisers' pre-extracted features into a feature store.

The organisers ship per-clip features (spec section 2)::

    ROOT/wav2vec2/{id}.pkl    audio, an array (T_a, D_a)
    ROOT/vit/{id}.pkl         vision, an array (T_v, D_v)
    ROOT/text/{id}.txt        the transcript (encoded here by a text encoder)

:func:`import_organiser_features` writes them to a :mod:`taemi.data.store` feature store,
so that training runs on them exactly as on features extracted by ``taemi extract``.

Pickles can execute code when loaded, so they are never loaded with ``pickle.load``.
:func:`load_feature_pickle` uses :class:`_SafeUnpickler`, whose ``find_class`` hands out
only the few functions that rebuild numpy arrays and torch tensors (listed in
:data:`ALLOWED_GLOBALS`) and refuses every other global with :class:`UnsafePickleError`
before anything runs. ``torch.storage._load_from_bytes`` (which a pickled tensor names,
and which calls ``torch.load(weights_only=False)``) is replaced by a function that loads
the same bytes with ``weights_only=True``. Files written by ``torch.save`` (a zip
archive, or the legacy format) are loaded with ``torch.load(weights_only=True)``; ``.npy``
files with ``numpy.load(allow_pickle=False)``.

What a feature file may hold (anything else is refused, naming the file):

- a numpy array or a torch tensor, of shape (T, D); (1, T, D) (a batch of one, as a
  Hugging Face model returns it) is taken as (T, D); (D,) as one frame (1, D);
- a dict holding exactly one array under ``features``/``feature``/``feats``/``feat``, or
  else exactly one array-valued entry (other entries, e.g. metadata, are ignored);
- a non-empty list or tuple of (D,) vectors of equal length, stacked into (T, D).

Values must be real numbers (float of any width, or integers), finite after conversion
to float32, with T >= 1 and D >= 1. A file that breaks a rule, cannot be read or has the
wrong D for the store is reported and that modality of the clip is marked missing; the
import goes on.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import functools
import io
import json
import logging
import os
import pickle
import re
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from taemi import MODALITIES
from taemi.data.clip import ClipFeatures, check_clip_id
from taemi.data.store import MANIFEST, TRANSCRIPTS, FeatureStore, StoreWriter
from taemi.extract.encoders.base import TextEncoder

__all__ = [
    "ALLOWED_GLOBALS",
    "ImportSummary",
    "UnsafePickleError",
    "import_organiser_features",
    "load_feature_pickle",
]

log = logging.getLogger(__name__)

#: Feature file extensions looked for in the audio and vision folders (``.pkl`` first).
FEATURE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".npy")
#: Dict keys naming the features when a file holds a dict.
ARRAY_KEYS = ("features", "feature", "feats", "feat")
REPORT_FILE = "import_report.json"
#: Feature size of a modality that is not imported (missing for every clip): the paper's
#: (spec section 3), so the store fits the paper model; override with ``dims={m: D}``.
DEFAULT_DIMS = {"audio": 1027, "vision": 768, "text": 768}

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a legacy torch.save file
_MAX_LOGGED = 20


class UnsafePickleError(ValueError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`; nothing of it was run."""


# --------------------------------------------------------------------------- safe loading


def _numpy_core(sub: str) -> Any:
    import importlib

    try:  # numpy >= 2
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:  # numpy 1.x
        return importlib.import_module(f"numpy.core.{sub}")


def _storage_from_bytes(data: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes``: the same, but weights_only."""
    import torch

    try:
        with warnings.catch_warnings():
            _quiet_torch_load_warnings()
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"a tensor's storage bytes: {_torch_refusal(e)}") from None


def _quiet_torch_load_warnings() -> None:
    """Inside ``warnings.catch_warnings()``: hide torch.load's notes that say nothing here."""
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Detected pickle protocol.*")


def _torch_refusal(e: pickle.UnpicklingError) -> str:
    """What ``torch.load(weights_only=True)`` refused, from its error message."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        what = f"refused global '{found.group(1)}'"
    else:  # torch's message: a generic preamble, the reason, a pointer to the docs
        parts = [p for p in text.split("\n\n") if p.strip()]
        what = f"refused: {' '.join((parts[1] if len(parts) > 2 else text).split())[:300]}"
    return f"torch.load(weights_only=True) {what}: a feature file may only hold arrays and tensors, so nothing in it was run"


def _torch_utils(name: str) -> Callable[[], Any]:
    def get() -> Any:
        import torch._utils

        return getattr(torch._utils, name)

    return get


#: (module, name) -> a function returning what the unpickler receives for that global.
#: Both numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) names are accepted.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    **{
        (f"numpy.{core}.{sub}", name): (lambda sub=sub, name=name: getattr(_numpy_core(sub), name))
        for core in ("core", "_core")
        for sub, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    },
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,  # bytes in protocol-2 pickles
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # a tensor's hooks
    ("torch._utils", "_rebuild_tensor_v2"): _torch_utils("_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"): _torch_utils("_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"): _torch_utils("_rebuild_parameter"),
    ("torch.storage", "_load_from_bytes"): lambda: _storage_from_bytes,
}


class _SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, fh: Any, path: Path):
        super().__init__(fh)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names, which protocol 0-2 pickles use (subprocess.Popen is written as
        # commands.Popen), translated as pickle's own find_class does with fix_imports
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        get = ALLOWED_GLOBALS.get((module, name))
        if get is None:
            raise UnsafePickleError(
                f"{self.path}: refused global '{module}.{name}': a feature pickle may only "
                "rebuild numpy arrays and torch tensors, so nothing in it was run"
            )
        found = get()
        if isinstance(found, types.FunctionType):
            # A fresh wrapper per use: a BUILD opcode can set attributes of what it gets
            # (e.g. __defaults__), and must not reach the real function.
            return functools.wraps(found)(lambda *a, **k: found(*a, **k))
        return found


def _torch_load(path: Path) -> Any:
    import torch

    try:
        with warnings.catch_warnings():
            _quiet_torch_load_warnings()
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: {_torch_refusal(e)}") from None
    except Exception as e:  # noqa: BLE001 - a damaged archive raises many types
        raise ValueError(f"{path}: cannot read the torch file: {type(e).__name__}: {e}") from None


def _load_object(path: Path) -> Any:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head.startswith(b"PK\x03\x04"):  # torch.save zip archive
            return _torch_load(path)
        if head.startswith(b"\x93NUMPY"):
            fh.seek(0)
            try:
                return np.load(fh, allow_pickle=False)
            except ValueError as e:
                raise ValueError(f"{path}: cannot read the .npy file: {e}") from None
        fh.seek(0)
        try:
            obj = _SafeUnpickler(fh, path).load()
        except UnsafePickleError as e:
            if str(e).startswith(f"{path}: "):
                raise
            raise UnsafePickleError(f"{path}: {e}") from None  # from a tensor's storage bytes
        except Exception as e:  # noqa: BLE001 - truncated or corrupt: many types
            raise ValueError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from None
    if isinstance(obj, int) and not isinstance(obj, bool) and obj == _TORCH_LEGACY_MAGIC:
        return _torch_load(path)  # legacy (non-zip) torch.save file
    return obj


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    return torch is not None and isinstance(obj, torch.Tensor)


def _as_numpy(obj: Any) -> np.ndarray | None:
    """``obj`` as a numpy array when it is an array or a tensor, else None."""
    if isinstance(obj, np.ndarray):
        return obj
    if _is_tensor(obj):
        t = obj.detach().cpu()
        if t.is_floating_point() and t.dtype not in (
            sys.modules["torch"].float32,
            sys.modules["torch"].float64,
        ):
            t = t.float()  # float16 / bfloat16: numpy has no bfloat16
        return t.numpy()
    return None


def _unwrap(obj: Any, path: Path) -> np.ndarray:
    """The one array ``obj`` holds (see the module docstring), or ValueError."""
    arr = _as_numpy(obj)
    if arr is not None:
        return arr
    if isinstance(obj, dict):
        named = [k for k in ARRAY_KEYS if k in obj]
        if len(named) > 1:
            raise ValueError(f"{path}: a dict with several feature keys {named}; expected one")
        if named:
            arr = _as_numpy(obj[named[0]])
            if arr is None:
                raise ValueError(
                    f"{path}: dict entry {named[0]!r} is a {type(obj[named[0]]).__name__}, not an array"
                )
            return arr
        arrays = [k for k, v in obj.items() if _as_numpy(v) is not None]
        if len(arrays) != 1:
            raise ValueError(
                f"{path}: a dict with keys {list(obj)[:10]} holds {len(arrays)} arrays; expected exactly one "
                f"array, or one under {'/'.join(ARRAY_KEYS)}"
            )
        return _as_numpy(obj[arrays[0]])  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)) and obj:
        rows = [_as_numpy(v) for v in obj]
        if any(r is None or r.ndim != 1 for r in rows) or len({r.shape for r in rows}) != 1:  # type: ignore[union-attr]
            raise ValueError(
                f"{path}: a {type(obj).__name__} that is not of equal-length (D,) vectors"
            )
        return np.stack(rows)  # (T, D)
    raise ValueError(f"{path}: holds a {type(obj).__module__}.{type(obj).__name__}, not an array")


def load_feature_pickle(path: str | os.PathLike[str]) -> np.ndarray:
    """One clip's features from an organiser feature file, as (T, D) float32.

    See the module docstring for what the file may hold. Raises
    :class:`UnsafePickleError` (a ``ValueError``) naming the file and the refused global
    when the pickle names anything but numpy/torch array rebuilding, ``ValueError``
    naming the file when it is unreadable, not an array, of another rank, empty, not
    real-valued or not finite, and ``FileNotFoundError`` when it does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"feature file {p} does not exist")
    arr = _unwrap(_load_object(p), p)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{p}: dtype {arr.dtype}; expected real numbers (float or integer)")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]  # (1, T, D) -> (T, D)
    elif arr.ndim == 1:
        arr = arr[None, :]  # (D,) -> (1, D)
    if arr.ndim != 2:
        raise ValueError(f"{p}: shape {arr.shape}; expected (T, D), (1, T, D) or (D,)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{p}: shape {arr.shape} is empty")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)  # (T, D)
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(f"{p}: {int(bad.sum())} of {out.size} values are NaN/Inf (as float32)")
    return out


# --------------------------------------------------------------------------- import


@dataclass
class ImportSummary:
    """What an import did; also written to ``STORE/import_report.json``."""

    store: str
    root: str
    text_encoder: str  # its name, or "none"
    total: int = 0  # ids considered
    done: int = 0  # clips written by this run
    skipped: int = 0  # already in the store (resumed)
    failed: int = 0  # ids not written at all (an invalid id, or the store refused the clip)
    missing: dict[str, int] = field(
        default_factory=lambda: {m: 0 for m in MODALITIES}
    )  # among done
    # {clip_id, modality, file, reason}: earlier runs' of the clips this run skipped, then this run's
    problems: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    report_file: str | None = None
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """False only when clips were to be imported and none could be."""
        return not (self.done == 0 and self.skipped == 0 and self.failed > 0)


def _problem(clip_id: str | None, modality: str | None, file: Path | None, reason: str) -> dict:
    return {
        "clip_id": clip_id,
        "modality": modality,
        "file": None if file is None else str(file),
        "reason": reason,
    }


def _index_folder(folder: Path, suffixes: tuple[str, ...], modality: str,
                  problems: list[dict]) -> dict[str, Path]:  # fmt: skip
    """Files of ``folder`` by stem (the earlier suffix of ``suffixes`` wins a shared stem)."""
    index: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in suffixes or not p.is_file():
            continue
        try:
            clip_id = check_clip_id(p.stem, source=str(p))
        except ValueError as e:
            problems.append(_problem(None, modality, p, str(e)))
            continue
        old = index.get(clip_id)
        if old is not None:
            keep = min(old, p, key=lambda q: suffixes.index(q.suffix.lower()))
            log.warning(
                "%s: clip %s has %s and %s; using %s", folder, clip_id, old.name, p.name, keep.name
            )
            p = keep
        index[clip_id] = p
    return index


def _folder(root: Path, name: str | os.PathLike[str] | None, what: str) -> Path | None:
    if name is None:
        return None
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder} does not exist (pass None / 'none' to import without {what})"
        )
    return folder


def _first_dim(index: dict[str, Path]) -> int | None:
    """D of the first readable feature file (id order); None when none is readable."""
    for clip_id in sorted(index):
        try:
            return int(load_feature_pickle(index[clip_id]).shape[1])
        except (ValueError, OSError):
            continue
    return None


def _provenance(folders: dict[str, Path | None], text_encoder: TextEncoder | None,
                text_dir: Path | None) -> dict[str, dict]:  # fmt: skip
    out: dict[str, dict] = {}
    for m in ("audio", "vision"):
        folder = folders[m]
        out[m] = (
            {"backbone": f"organiser:{folder.name}", "settings": {"source": str(folder)}}
            if folder is not None
            else {
                "backbone": "none",
                "settings": {"note": f"not imported: {m} missing for every clip"},
            }
        )
    transcripts = None if text_dir is None else str(text_dir)
    if text_encoder is None or text_dir is None:
        why = "no text encoder" if text_encoder is None else "no transcripts"
        out["text"] = {"backbone": "none", "settings": {"transcripts": transcripts,
                                                       "note": f"{why}: text missing for every clip"}}  # fmt: skip
    else:
        out["text"] = {
            "backbone": text_encoder.name,
            "settings": {**text_encoder.settings, "transcripts": transcripts},
        }
    return out


def _resolve_dims(store: Path, given: Mapping[str, int], indexes: dict[str, dict[str, Path]],
                  folders: dict[str, Path | None], text_encoder: TextEncoder | None) -> dict[str, int] | None:  # fmt: skip
    """Dims for a new store (None when the store exists: its own dims are used)."""
    if (store / MANIFEST).exists():
        return None
    unknown = set(given) - set(MODALITIES)
    if unknown:
        raise ValueError(
            f"dims has unknown modalities {sorted(unknown)}; known: {list(MODALITIES)}"
        )
    dims: dict[str, int] = {}
    for m in ("audio", "vision"):
        if folders[m] is None:
            dims[m] = int(given.get(m, DEFAULT_DIMS[m]))
            continue
        d = given.get(m) or _first_dim(indexes[m])
        if d is None:
            raise ValueError(
                f"cannot tell the {m} feature size: no readable {m} feature file; "
                f"pass dims={{'{m}': D}} to create the store {store}"
            )
        dims[m] = int(d)
    dims["text"] = int(
        text_encoder.dim if text_encoder is not None else given.get("text", DEFAULT_DIMS["text"])
    )
    return dims


def import_organiser_features(
    root: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    text_encoder: TextEncoder | None,
    audio_dir: str | os.PathLike[str] | None = "wav2vec2",
    vision_dir: str | os.PathLike[str] | None = "vit",
    text_dir: str | os.PathLike[str] | None = "text",
    ids: Iterable[str] | None = None,
    dims: Mapping[str, int] | None = None,
    dtype: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> ImportSummary:
    """Write the organisers' features under ``root`` into the feature store ``store``.

    Args:
        root: folder holding ``audio_dir``, ``vision_dir`` and ``text_dir``.
        store: feature store folder; created, or extended (clips already in it are
            skipped, so an interrupted import resumes where it stopped).
        text_encoder: encodes each transcript into the text vector (the offline MiniLM,
            the paper's GTE, ...); ``None`` imports no text (text missing for every clip,
            recorded in the store's provenance).
        audio_dir, vision_dir, text_dir: folders under ``root`` (or absolute paths); a
            folder given must exist; ``None`` leaves that modality missing for every clip.
        ids: the clips to import, in order; ``None``: every id with a file in any folder.
        dims: feature sizes for a new store: of a modality not imported (default
            :data:`DEFAULT_DIMS`, the paper's), or one whose files are all unreadable; a
            given size wins over the files' (a file of another size is then a problem).
            Ignored for an existing store (its dims rule). The text size is the encoder's.
        dtype: store dtype for a new store ("float16", the default, or "float32").
        batch_size: transcripts per text-encoder call.
        progress: show a progress bar.

    A clip's modality is missing when its file is absent, unreadable, unsafe, of the
    wrong size or out of the store dtype's range (each such file is a reported problem), or when its transcript is empty
    (not a problem). A clip with every modality missing is still written: predictions
    need a row for every listed id.
    """
    t0 = time.perf_counter()
    root = Path(root).resolve()
    store = Path(store)
    if not root.is_dir():
        raise FileNotFoundError(f"organiser feature root {root} does not exist or is not a folder")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(ids, str):
        raise TypeError(f"ids must be a list of clip ids, got the string {ids!r}")
    folders = {
        "audio": _folder(root, audio_dir, "audio"),
        "vision": _folder(root, vision_dir, "vision"),
        "text": _folder(root, text_dir, "text"),
    }
    summary = ImportSummary(store=str(store), root=str(root),
                            text_encoder="none" if text_encoder is None else text_encoder.name)  # fmt: skip
    if text_encoder is None:
        log.info("no text encoder: text is missing for every clip (transcripts are not read)")
    problems = summary.problems
    indexes: dict[str, dict[str, Path]] = {}
    for m in MODALITIES:
        folder = folders[m]
        suffixes = (".txt",) if m == "text" else FEATURE_SUFFIXES
        indexes[m] = {} if folder is None else _index_folder(folder, suffixes, m, problems)
    wanted = sorted(set().union(*indexes.values())) if ids is None else list(ids)
    summary.total = len(wanted)
    if not wanted:
        raise FileNotFoundError(
            f"no clips to import: no feature files in {', '.join(str(f) for f in folders.values() if f)}"
        )
    new_dims = _resolve_dims(store, dict(dims or {}), indexes, folders, text_encoder)
    modalities = _provenance(folders, text_encoder, folders["text"])
    opened, written = False, set()  # written: ids this run added to the store
    try:
        with StoreWriter(store, dims=new_dims, dtype=dtype, text_tokens=False if new_dims else None,
                         modalities=modalities) as writer:  # fmt: skip
            if writer.text_tokens:
                raise ValueError(
                    f"the store {store} keeps text token states; organiser features have none"
                )
            if text_encoder is not None and writer.dims["text"] != text_encoder.dim:
                raise ValueError(
                    f"text encoder {text_encoder.name} gives {text_encoder.dim}-d vectors, the store "
                    f"{store} holds {writer.dims['text']}-d text"
                )
            (store / TRANSCRIPTS).mkdir(exist_ok=True)
            todo = _checked_ids(wanted, writer, summary)
            opened = True
            _import(
                todo, writer, indexes, folders, text_encoder, batch_size, summary, progress, written
            )
    except BaseException:
        summary.interrupted = True
        raise
    finally:  # also after a crash or Ctrl-C, once the store could be opened
        summary.wall_seconds = time.perf_counter() - t0
        if opened:
            _report(store, summary, written)
    return summary


def _checked_ids(wanted: list[str], writer: StoreWriter, summary: ImportSummary) -> list[str]:
    """Valid, first-seen ids not yet in the store (the others are counted and reported)."""
    todo: list[str] = []
    seen: set[str] = set()
    for raw in wanted:
        try:
            clip_id = check_clip_id(raw, source="ids")
        except ValueError as e:
            summary.problems.append(_problem(None, None, None, str(e)))
            summary.failed += 1
            continue
        if clip_id in seen:
            summary.problems.append(
                _problem(clip_id, None, None, f"clip id {clip_id!r} is listed twice")
            )
            summary.failed += 1
            continue
        seen.add(clip_id)
        if clip_id in writer:
            summary.skipped += 1
        else:
            todo.append(clip_id)
    if summary.skipped:
        log.info(
            "%d of %d clips are already in %s: skipped", summary.skipped, len(wanted), writer.root
        )
    return todo


def _load_sequence(clip_id: str, m: str, index: dict[str, Path], folder: Path | None, dim: int,
                   limit: float, problems: list[dict]) -> np.ndarray | None:  # fmt: skip
    """A clip's (T, D) features of modality ``m``, or None (missing; reported)."""
    if folder is None:
        return None
    path = index.get(clip_id)
    if path is None:
        problems.append(_problem(clip_id, m, folder / f"{clip_id}.pkl", "no such file"))
        return None
    try:
        arr = load_feature_pickle(path)  # (T, D)
    except (ValueError, OSError) as e:
        problems.append(_problem(clip_id, m, path, str(e)))
        return None
    if arr.shape[1] != dim:
        problems.append(
            _problem(
                clip_id,
                m,
                path,
                f"shape {arr.shape}: D = {arr.shape[1]}, the store has {m} D = {dim}",
            )
        )
        return None
    peak = float(np.abs(arr).max())
    if peak > limit:
        problems.append(_problem(clip_id, m, path, f"max |x| = {peak:g} does not fit the store's "
                                 f"dtype (largest {limit:g}); import into a float32 store"))  # fmt: skip
        return None
    return arr


def _read_transcript(
    clip_id: str, index: dict[str, Path], folder: Path, problems: list[dict]
) -> str | None:
    """The transcript text ('' when empty), or None when it has no readable file (reported)."""
    path = index.get(clip_id)
    if path is None:
        problems.append(_problem(clip_id, "text", folder / f"{clip_id}.txt", "no such file"))
        return None
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(
            _problem(clip_id, "text", path, f"unreadable transcript: {type(e).__name__}: {e}")
        )
        return None


def _encode_texts(encoder: TextEncoder, texts: list[str], ids: list[str], folder: Path,
                  problems: list[dict]) -> list[np.ndarray | None]:  # fmt: skip
    """(D_t,) vectors of ``texts``; a batch that fails is retried text by text."""
    try:
        vecs, _ = encoder.encode(texts)  # (N, D_t)
        return list(vecs)
    except (ValueError, RuntimeError) as e:
        if len(texts) == 1:
            problems.append(_problem(ids[0], "text", folder / f"{ids[0]}.txt",
                                     f"text encoder failed: {type(e).__name__}: {e}"))  # fmt: skip
            return [None]
        log.warning(
            "a batch of %d transcripts failed to encode (%s); retrying one by one", len(texts), e
        )
        return [
            v
            for t, i in zip(texts, ids)
            for v in _encode_texts(encoder, [t], [i], folder, problems)
        ]


def _import(todo: list[str], writer: StoreWriter, indexes: dict[str, dict[str, Path]],
            folders: dict[str, Path | None], text_encoder: TextEncoder | None, batch_size: int,
            summary: ImportSummary, progress: bool, written: set[str]) -> None:  # fmt: skip
    problems, dims = summary.problems, writer.dims
    limit = float(np.finfo(writer.dtype).max)  # largest value the store dtype holds
    transcripts_dir = writer.root / TRANSCRIPTS
    bar = tqdm(
        total=len(todo), desc="import", unit="clip", disable=not progress, dynamic_ncols=True
    )
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        seqs = {
            m: [
                _load_sequence(c, m, indexes[m], folders[m], dims[m], limit, problems)
                for c in chunk
            ]
            for m in ("audio", "vision")
        }
        texts: list[str | None] = [None] * len(chunk)
        if text_encoder is not None and folders["text"] is not None:
            texts = [_read_transcript(c, indexes["text"], folders["text"], problems) for c in chunk]
        present = [k for k, t in enumerate(texts) if t]  # empty transcript: text missing
        vecs: list[np.ndarray | None] = [None] * len(chunk)
        if present and text_encoder is not None and folders["text"] is not None:
            encoded = _encode_texts(
                text_encoder,
                [str(texts[k]) for k in present],
                [chunk[k] for k in present],
                folders["text"],
                problems,
            )
            for k, v in zip(present, encoded):
                vecs[k] = v  # (D_t,)
        for k, clip_id in enumerate(chunk):
            clip = ClipFeatures(clip_id, seqs["audio"][k], seqs["vision"][k], vecs[k])
            try:
                writer.add(clip)
            except ValueError as e:  # not expected: every array was checked above
                problems.append(_problem(clip_id, None, None, f"not written: {e}"))
                summary.failed += 1
                continue
            text = texts[k]
            if text is not None:
                tmp = transcripts_dir / f"{clip_id}.txt.tmp"
                tmp.write_text(text + "\n", encoding="utf-8")
                os.replace(tmp, transcripts_dir / f"{clip_id}.txt")
            summary.done += 1
            written.add(clip_id)
            for m, miss in zip(MODALITIES, clip.missing):
                summary.missing[m] += int(miss)
        bar.update(len(chunk))
        bar.set_postfix(problems=len(problems))
    bar.close()


def _report(store: Path, summary: ImportSummary, written: set[str]) -> None:
    """Write ``STORE/import_report.json``: this run, plus the earlier runs' problems of the
    clips in the store that this run did not write (so the report covers every clip)."""
    path = store / REPORT_FILE
    earlier: list[dict] = []
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            keep = set(FeatureStore(store).ids) - written
            earlier = [p for p in old.get("problems", []) if p.get("clip_id") in keep]
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("%s: earlier report unreadable (%s); it is replaced", path, e)
    for p in summary.problems[:_MAX_LOGGED]:
        log.warning("%s %s: %s", p["clip_id"], p["modality"] or "", p["reason"])
    if len(summary.problems) > _MAX_LOGGED:
        log.warning("... and %d more problems, see %s", len(summary.problems) - _MAX_LOGGED, path)
    summary.problems[:0] = earlier
    summary.report_file = str(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**asdict(summary), "ok": summary.ok}, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def summary_line(summary: ImportSummary) -> str:
    """One line of counts, for the CLI."""
    miss = summary.missing
    return (
        f"{summary.done} imported, {summary.skipped} skipped, {summary.failed} failed; missing: "
        f"audio {miss['audio']}, vision {miss['vision']}, text {miss['text']}; "
        f"{len(summary.problems)} problem(s) in {summary.wall_seconds:.1f} s"
    )
