"""Import the ABAW EMI organisers' pre-extracted features into a feature store.

The organisers ship per-clip features (docs/method.md section 2)::

    ROOT/wav2vec2/{id}.pkl    audio, an array (T_a, D_a)
    ROOT/vit/{id}.pkl         vision, an array (T_v, D_v)
    ROOT/text/{id}.txt        the transcript (encoded here by a text encoder)

:func:`import_organiser_features` writes them to a :mod:`taemi.store` feature store,
so that training runs on them exactly as on features extracted by ``taemi extract``.

Safe loading. Pickles can execute code when loaded, so they are never loaded with
``pickle.load``. :func:`load_feature_pickle` uses :class:`_SafeUnpickler`, whose
``find_class`` hands out only the few functions that rebuild numpy arrays and torch
tensors (listed in :data:`ALLOWED_GLOBALS`) and refuses every other global with
:class:`UnsafePickleError` before anything runs. Each of those functions is a checked
stand-in: it refuses, before anything is allocated, an array or tensor whose declared
shape holds more than :data:`MAX_FEATURE_ELEMENTS` values or :data:`MAX_FEATURE_BYTES`
bytes (:class:`FeatureTooLargeError`; a pickle of a few dozen bytes can declare any
shape), arrays of Python objects, structured dtypes, and any array form numpy itself does
not write. ``BUILD`` (setting an object's state) is allowed only on a new, empty numpy
array and on a dtype (which is rebuilt rather than changed in place, so a dtype already
in use cannot be altered). The file is read whole (at most :data:`MAX_FEATURE_FILE_BYTES`)
and unpickled by Python's pure-Python unpickler, which never reserves more memory than
the file holds. ``torch.storage._load_from_bytes`` (which a pickled tensor names, and
which calls ``torch.load(weights_only=False)``) is replaced by a function that loads the
same bytes with ``weights_only=True``. Files written by ``torch.save`` (a zip archive, or
the legacy format) are loaded with ``torch.load(weights_only=True)``; ``.npy`` files with
``numpy.load(allow_pickle=False)`` after their header's shape is checked against the same
limits. Every array or tensor is checked against the limits again before it is converted.

What a feature file may hold (anything else is refused, naming the file):

- a numpy array or a torch tensor, of shape (T, D); (1, T, D) (a batch of one, as a
  Hugging Face model returns it) is taken as (T, D); (D,) as one frame (1, D);
- a dict holding exactly one array under ``features``/``feature``/``feats``/``feat``, or
  else exactly one array-valued entry (other entries, e.g. metadata, are ignored);
- a non-empty list or tuple of (D,) vectors of equal length, stacked into (T, D).

Values must be real numbers (float of any width, or integers), finite after conversion
to float32, with T >= 1 and D >= 1.

Feature sizes. A new store's audio and vision sizes D are decided by agreement: up to
:data:`DIM_SAMPLE` files of the modality, spread over the id order, are read, and the
size held by more than half of the readable ones wins (the decision and the count are
logged); without such a majority the import stops with an error asking for the size.
``dims={"audio": D}`` (``taemi import --dims audio=D``) gives it instead. An existing
store's sizes rule (a given size that differs is an error).

Rejected files and missing modalities. A clip's modality is missing (and the clip is
written) when its file is absent, or its transcript is empty. A file that is present but
cannot be used (unreadable, unsafe, too large, of another feature size D than the store,
out of the store dtype's range), and a transcript the text encoder fails on, are
rejected: the clip is not written at all, and each rejected file is recorded in the
store's error file (:data:`taemi.store.ERRORS_FILE`, one JSON line each, as
``taemi extract`` records its failures) and logged as a warning. A failed clip is not in
the store, so the next run retries it: fix or replace the file and run the same command
again (clips already in the store are skipped). A file whose name is not a valid clip id
is rejected the same way. :attr:`ImportSummary.failed` counts the clips not written,
:attr:`ImportSummary.rejected` the rejected files; ``taemi import`` exits with status 1
when there are any.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import contextvars
import functools
import io
import json
import logging
import math
import operator
import os
import pickle
import re
import sys
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from taemi import MODALITIES
from taemi.backbones.base import TextEncoder
from taemi.store import ERRORS_FILE, MANIFEST, TRANSCRIPTS, FeatureStore, StoreWriter
from taemi.store.clip import ClipFeatures, check_clip_id

__all__ = [
    "ALLOWED_GLOBALS",
    "MAX_FEATURE_BYTES",
    "MAX_FEATURE_ELEMENTS",
    "MAX_FEATURE_FILE_BYTES",
    "FeatureTooLargeError",
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
#: (docs/method.md section 3), so the store fits the paper model; override with ``dims={m: D}``.
DEFAULT_DIMS = {"audio": 1027, "vision": 768, "text": 768}
#: Files read per modality to decide a new store's feature size (spread over the ids).
DIM_SAMPLE = 32

#: Most values one feature array may declare; checked before anything is allocated.
#: Real ABAW files are below it: wav2vec2 gives 50 frames/s x 1027 values, and the
#: corpus's longest recordings (about 1,250 s, docs/method.md section 2) make 62,500 x 1027 = 64 M
#: values if a file keeps every frame; 2**27 (134 M values) leaves twice that.
MAX_FEATURE_ELEMENTS = 2**27
#: Most bytes one feature array may declare (2**27 float64 values), checked likewise.
MAX_FEATURE_BYTES = 2**30
#: Largest feature file read (a pickle is read whole before it is unpickled): an array at
#: the byte limit, twice over for the pickle's overhead and any metadata.
MAX_FEATURE_FILE_BYTES = 2 * MAX_FEATURE_BYTES
#: The array data of a feature file is stored in the file itself (pickles, ``torch.save``
#: and ``.npy`` files are not compressed), so no array may declare more bytes than the
#: file being read holds, plus this much: a few dozen bytes cannot honestly describe
#: megabytes of features (a stride-0 view or a memoised row repeated can declare them).
_FILE_SLACK_BYTES = 4096
#: Size of the feature file being read (set by :func:`_load_object`), for the rule above.
_FILE_BYTES: contextvars.ContextVar[int | None] = contextvars.ContextVar("_FILE_BYTES", default=None)

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a legacy torch.save file


class UnsafePickleError(ValueError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`, or uses one in a way numpy
    and torch never do; nothing of it was run."""


class FeatureTooLargeError(ValueError):
    """A feature file declares an array above :data:`MAX_FEATURE_ELEMENTS` values or
    :data:`MAX_FEATURE_BYTES` bytes (or is above :data:`MAX_FEATURE_FILE_BYTES`); it was
    refused before that memory was allocated."""


def _check_declared(shape: Any, itemsize: int, what: str) -> tuple[int, ...]:
    """``shape`` as a tuple of ints; FeatureTooLargeError when it is over the limits."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(operator.index(n) for n in shape)
    except TypeError:
        raise UnsafePickleError(f"{what}: shape {shape!r} is not a tuple of ints") from None
    if any(n < 0 for n in dims):
        raise UnsafePickleError(f"{what}: shape {dims} has a negative size")
    n = math.prod(dims)
    if n > MAX_FEATURE_ELEMENTS or n * itemsize > MAX_FEATURE_BYTES:
        raise FeatureTooLargeError(
            f"{what} declares shape {dims}: {n:,} values of {itemsize} bytes ({n * itemsize:,} "
            f"bytes); a feature array may hold at most {MAX_FEATURE_ELEMENTS:,} values and "
            f"{MAX_FEATURE_BYTES:,} bytes, so it was refused before being allocated"
        )
    file_bytes = _FILE_BYTES.get()
    if file_bytes is not None and n * itemsize > file_bytes + _FILE_SLACK_BYTES:
        raise FeatureTooLargeError(
            f"{what} declares shape {dims}: {n:,} values, {n * itemsize:,} bytes of data in a file of "
            f"{file_bytes:,} bytes, which cannot hold them, so it was refused before being allocated"
        )
    return dims


# --------------------------------------------------------------------------- safe loading


def _numpy_core(sub: str) -> Any:
    import importlib

    try:  # numpy >= 2
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:  # numpy 1.x
        return importlib.import_module(f"numpy.core.{sub}")


def _plain_dtype(d: np.dtype, what: str) -> np.dtype:
    """``d`` if it is a plain (not structured, not subarray) dtype, else UnsafePickleError."""
    if d.fields is not None or d.subdtype is not None:
        raise UnsafePickleError(
            f"{what}: a structured or subarray dtype {d}; a feature file holds plain arrays"
        )
    return d


def _no_objects(d: np.dtype, what: str) -> None:
    if d.hasobject:
        raise ValueError(f"{what}: dtype {d}: an array of Python objects; expected real numbers")


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """Stand-in for ``numpy.dtype(obj, align, copy)`` (as numpy pickles a dtype): a type
    code only (``'f8'``, ``'<f4'``, ...), not a structured or subarray dtype."""
    if not isinstance(obj, str) or len(obj) > 32:
        raise UnsafePickleError(f"numpy.dtype({obj!r:.60}): numpy pickles a dtype by its type code")
    return _plain_dtype(np.dtype(obj, bool(align), bool(copy)), "numpy.dtype")


def _rebuilt_dtype(old: np.dtype, state: Any) -> np.dtype:
    """What ``BUILD`` of ``old`` with ``state`` gives, as a new dtype (``old`` may already
    be in use by an array: changing it in place could make that array's item size lie)."""
    if not isinstance(state, tuple) or len(state) < 8 or state[2:5] != (None, None, None):
        raise UnsafePickleError(
            f"a dtype state {state!r:.120} that numpy does not write for a plain dtype"
        )
    fresh = np.dtype(old.str, False, True)  # a new object (np.dtype(old, copy=True) may be old)
    if fresh is old:
        raise UnsafePickleError("a dtype state: cannot rebuild the dtype apart from the one in use")
    fresh.__setstate__(state)
    _plain_dtype(fresh, "a dtype state")
    out = np.dtype(fresh.str)
    if out != fresh or out.itemsize != fresh.itemsize:
        raise UnsafePickleError(f"a dtype state {state!r:.120} that numpy does not write")
    return out


class _ArrayClass:
    """What a pickle gets for ``numpy.ndarray``: the token numpy passes to
    ``_reconstruct``. Called directly (numpy never pickles an array that way) it refuses,
    checking the declared size first so that a huge array is reported as such."""

    def __call__(self, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> None:
        d = _plain_dtype(
            np.dtype(dtype if isinstance(dtype, (str, bytes, np.dtype)) else "f8"), "numpy.ndarray"
        )
        _check_declared(shape, d.itemsize, "numpy.ndarray(...)")
        raise UnsafePickleError(
            "numpy.ndarray(...) called directly: numpy never pickles an array that way"
        )

    def __repr__(self) -> str:
        return "numpy.ndarray (restricted)"


_ARRAY_CLASS = _ArrayClass()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """Stand-in for ``numpy.core.multiarray._reconstruct``: numpy pickles an array as an
    empty one, ``_reconstruct(ndarray, (0,), b'b')``, then sets its state (``BUILD``)."""
    if not isinstance(dtype, (str, bytes, np.dtype)):
        raise UnsafePickleError(f"_reconstruct with dtype {dtype!r:.60}")
    d = _plain_dtype(np.dtype(dtype), "_reconstruct")
    dims = _check_declared(shape, d.itemsize, "numpy _reconstruct")
    if subtype is not _ARRAY_CLASS or math.prod(dims) != 0:
        raise UnsafePickleError(
            f"_reconstruct({subtype!r:.60}, {dims}, ...): numpy pickles an array as an empty "
            "numpy.ndarray and its state"
        )
    return _numpy_core("multiarray")._reconstruct(np.ndarray, dims, d)


def _check_array_state(state: Any) -> None:
    """The state ``BUILD`` gives a new array: (version, shape, dtype, fortran, bytes)."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise UnsafePickleError(f"an array state {state!r:.120} that numpy does not write")
    shape, dtype, _, data = state[-4:]
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError(f"an array state whose dtype is a {type(dtype).__name__}")
    _no_objects(dtype, "an array")
    dims = _check_declared(shape, dtype.itemsize, "an array")
    if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(dims) * dtype.itemsize:
        size = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise ValueError(f"an array of shape {dims} and dtype {dtype} with data of {size} bytes")


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, *axis_order: Any) -> np.ndarray:
    """Stand-in for ``numpy.core.numeric._frombuffer`` (protocol 5 pickles; numpy 2 adds
    ``axis_order`` for an array neither C- nor Fortran-contiguous)."""
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError(f"_frombuffer with dtype {dtype!r:.60}")
    _no_objects(dtype, "an array")
    dims = _check_declared(shape, dtype.itemsize, "an array")
    if not isinstance(buf, (bytes, bytearray)) or len(buf) != math.prod(dims) * dtype.itemsize:
        raise ValueError(
            f"an array of shape {dims} and dtype {dtype} with a buffer of another size"
        )
    return _numpy_core("numeric")._frombuffer(buf, dtype, dims, order, *axis_order)


def _scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for ``numpy.core.multiarray.scalar``: a number from its bytes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"a numpy scalar of dtype {dtype!r:.60}")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"a numpy scalar of dtype {dtype} without its {dtype.itemsize} bytes")
    return _numpy_core("multiarray").scalar(dtype, data)


def _encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``: bytes in protocol 0-2 pickles (latin-1 only)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError(
            f"_codecs.encode(..., {encoding!r:.30}): pickles encode bytes as latin1"
        )
    return codecs.encode(obj, "latin1")


def _storage_from_bytes(data: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes``: the same, but weights_only."""
    import torch

    if not isinstance(data, bytes):
        raise UnsafePickleError(f"a tensor's storage from a {type(data).__name__}, not bytes")
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


def _rebuild_tensor(name: str) -> Callable[[], Any]:
    """Stand-in for ``torch._utils.<name>(storage, offset, size, stride, ...)``: the size is
    checked first (a small storage viewed with stride 0 can declare any size)."""

    def get() -> Any:
        import torch._utils

        real = getattr(torch._utils, name)

        def rebuild(storage: Any, storage_offset: Any, size: Any, *rest: Any) -> Any:
            with warnings.catch_warnings():
                _quiet_torch_load_warnings()  # element_size() of a TypedStorage
                itemsize = storage.element_size() if hasattr(storage, "element_size") else 1
            _check_declared(size, int(itemsize), "a tensor")
            return real(storage, storage_offset, size, *rest)

        return rebuild

    return get


def _torch_parameter() -> Any:
    import torch._utils

    return torch._utils._rebuild_parameter  # its data is a tensor already rebuilt (checked)


#: (module, name) -> a function returning what the unpickler receives for that global.
#: Both numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) names are accepted.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    **{
        (f"numpy.{core}.{sub}", name): get
        for core in ("core", "_core")
        for sub, name, get in (
            ("multiarray", "_reconstruct", lambda: _reconstruct),
            ("multiarray", "scalar", lambda: _scalar),
            ("numeric", "_frombuffer", lambda: _frombuffer),
        )
    },
    ("numpy", "ndarray"): lambda: _ARRAY_CLASS,
    ("numpy", "dtype"): lambda: _dtype,
    ("_codecs", "encode"): lambda: _encode,  # bytes in protocol-2 pickles
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # a tensor's hooks
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor("_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor("_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"): _torch_parameter,
    ("torch.storage", "_load_from_bytes"): lambda: _storage_from_bytes,
}


class _SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """An Unpickler that resolves only :data:`ALLOWED_GLOBALS` and restricts ``BUILD``.

    It is the pure-Python unpickler (``pickle._Unpickler``): unlike the C one, it reads a
    length-prefixed bytes object without first reserving the length the file declares,
    and its opcode table can be extended (``BUILD`` here).
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

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
            # A fresh wrapper per use, so that nothing can reach the real function
            return functools.wraps(found)(lambda *a, **k: found(*a, **k))
        return found

    def load_build(self) -> None:
        """``BUILD``: only a new, empty array gets a (checked) state; a dtype is rebuilt."""
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            self.stack.pop()
            self.stack[-1] = _rebuilt_dtype(inst, state)
        elif (
            isinstance(inst, np.ndarray)
            and inst.size == 0
            and inst.base is None
            and inst.flags.owndata
        ):
            _check_array_state(state)
            super().load_build()  # ndarray.__setstate__
        else:
            raise UnsafePickleError(
                f"{self.path}: refused to set the state of a {type(inst).__module__}."
                f"{type(inst).__qualname__}: numpy and torch pickles do not"
            )

    dispatch[pickle.BUILD[0]] = load_build


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


def _load_npy(fh: Any, path: Path) -> np.ndarray:
    """A .npy file's array, its header's shape checked before the array is allocated."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    try:
        version = fmt.read_magic(fh)
        if version not in readers:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (structured arrays)")
        shape, _, dtype = readers[version](fh)
        _check_declared(shape, np.dtype(dtype).itemsize, "its header")
        fh.seek(0)
        return np.load(fh, allow_pickle=False)
    except FeatureTooLargeError as e:
        raise FeatureTooLargeError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: cannot read the .npy file: {e}") from None


def _load_object(path: Path) -> Any:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_FEATURE_FILE_BYTES:
            raise FeatureTooLargeError(
                f"{path}: {size:,} bytes; a feature file may have at most {MAX_FEATURE_FILE_BYTES:,}"
            )
        head = fh.read(8)
        if head.startswith(b"PK\x03\x04"):  # torch.save zip archive
            return _torch_load(path)
        if head.startswith(b"\x93NUMPY"):
            fh.seek(0)
            return _load_npy(fh, path)
        fh.seek(0)
        data = fh.read()
    try:
        obj = _SafeUnpickler(io.BytesIO(data), path).load()
    except (UnsafePickleError, FeatureTooLargeError) as e:
        if str(e).startswith(f"{path}: "):
            raise
        raise type(e)(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt: many types
        raise ValueError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from None
    if isinstance(obj, int) and not isinstance(obj, bool) and obj == _TORCH_LEGACY_MAGIC:
        return _torch_load(path)  # legacy (non-zip) torch.save file
    return obj


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    return torch is not None and isinstance(obj, torch.Tensor)


def _as_numpy(obj: Any) -> np.ndarray | None:
    """``obj`` as a numpy array when it is an array or a tensor (checked against the size
    limits before anything is copied), else None."""
    if isinstance(obj, np.ndarray):
        _check_declared(obj.shape, obj.itemsize, "an array")
        return obj
    if _is_tensor(obj):
        t = obj.detach()
        _check_declared(tuple(t.shape), t.element_size(), "a tensor")  # stride 0 views too
        t = t.cpu()
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
        _check_declared(
            (len(rows), rows[0].shape[0]), max(r.itemsize for r in rows), "a list of vectors"
        )  # type: ignore[union-attr]
        return np.stack(rows)  # (T, D)
    raise ValueError(f"{path}: holds a {type(obj).__module__}.{type(obj).__name__}, not an array")


def load_feature_pickle(path: str | os.PathLike[str]) -> np.ndarray:
    """One clip's features from an organiser feature file, as (T, D) float32.

    See the module docstring for what the file may hold. Raises
    :class:`UnsafePickleError` (a ``ValueError``) naming the file and the refused global
    when the pickle names anything but numpy/torch array rebuilding,
    :class:`FeatureTooLargeError` (a ``ValueError``) when it declares an array above
    :data:`MAX_FEATURE_ELEMENTS` values or :data:`MAX_FEATURE_BYTES` bytes (refused
    before allocating it), ``ValueError`` naming the file when it is unreadable, not an
    array, of another rank, empty, not real-valued or not finite, and
    ``FileNotFoundError`` when it does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"feature file {p} does not exist")
    token = _FILE_BYTES.set(p.stat().st_size)  # no array may declare more data than the file holds
    try:
        arr = _unwrap(_load_object(p), p)
    except FeatureTooLargeError as e:
        if str(e).startswith(f"{p}: "):
            raise
        raise FeatureTooLargeError(f"{p}: {e}") from None
    finally:
        _FILE_BYTES.reset(token)
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
    failed: int = 0  # ids not written: a rejected file, an invalid id, the store refused it
    rejected: int = 0  # files rejected (present but unusable); each is in ``errors``
    missing: dict[str, int] = field(
        default_factory=lambda: {m: 0 for m in MODALITIES}
    )  # among done
    dims: dict[str, int] = field(default_factory=dict)  # the store's feature sizes
    # this run's failures, as written to STORE/extract_errors.jsonl:
    # {clip_id, path, stage ("input", "read", "encode", "write"), modality, reason, time}
    errors: list[dict] = field(default_factory=list)
    # {clip_id, modality, path}: absent files (that modality missing), for every clip in the
    # store: the earlier runs' of the clips this run skipped, then this run's
    absent: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    report_file: str | None = None
    errors_file: str | None = None  # set when this run had errors
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """True when no file was rejected and no clip failed."""
        return not self.errors


def _error(
    clip_id: str | None, modality: str | None, path: Path | None, stage: str, reason: str
) -> dict:
    """One error record, shaped like ``taemi extract``'s (plus ``modality``)."""
    return {"clip_id": clip_id, "path": None if path is None else str(path), "stage": stage,
            "modality": modality, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip


def _reject(errors: list[dict], clip_id: str | None, modality: str | None, path: Path | None,
            stage: str, reason: str) -> None:  # fmt: skip
    """Record a rejected file (or a failed step) and say so, one warning line."""
    errors.append(_error(clip_id, modality, path, stage, reason))
    log.warning("rejected: clip %s %s: %s", clip_id, modality or "", reason)


def _index_folder(folder: Path, suffixes: tuple[str, ...], modality: str,
                  errors: list[dict]) -> dict[str, Path]:  # fmt: skip
    """Files of ``folder`` by stem (the earlier suffix of ``suffixes`` wins a shared stem)."""
    index: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in suffixes or not p.is_file():
            continue
        try:
            clip_id = check_clip_id(p.stem, source=str(p))
        except ValueError as e:
            _reject(errors, None, modality, p, "input", str(e))
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


def _agreed_dim(m: str, index: dict[str, Path], folder: Path) -> int:
    """The feature size D of most of the files of ``index`` (a sample of DIM_SAMPLE spread
    over the id order): the size more than half of the readable files read have."""
    ids = sorted(index)
    if len(ids) > DIM_SAMPLE:
        ids = [ids[round(k * (len(ids) - 1) / (DIM_SAMPLE - 1))] for k in range(DIM_SAMPLE)]
    counts: Counter[int] = Counter()
    unreadable = 0
    for clip_id in ids:
        try:
            counts[int(load_feature_pickle(index[clip_id]).shape[1])] += 1
        except (ValueError, OSError):
            unreadable += 1
    readable = sum(counts.values())
    ask = f"pass --dims {m}=D (in Python: dims={{'{m}': D}}) to create the store"
    if not readable:
        raise ValueError(f"cannot tell the {m} feature size: none of the {len(ids)} {m} feature "
                         f"files read in {folder} is readable; {ask}")  # fmt: skip
    seen = ", ".join(f"D = {d}: {n}" for d, n in counts.most_common())
    seen += f", unreadable: {unreadable}" if unreadable else ""
    d, n = counts.most_common(1)[0]
    if 2 * n <= readable:
        raise ValueError(f"cannot tell the {m} feature size: the {len(ids)} {m} feature files read in "
                         f"{folder} disagree ({seen}), and no size is held by more than half of the "
                         f"readable ones; {ask}")  # fmt: skip
    log.info("%s feature size D = %d: %d of the %d files read agree (%s; %d files in %s)",
             m, d, n, len(ids), seen, len(index), folder)  # fmt: skip
    return d


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


def _check_given_dims(given: Mapping[str, Any]) -> dict[str, int]:
    unknown = set(given) - set(MODALITIES)
    if unknown:
        raise ValueError(
            f"dims has unknown modalities {sorted(unknown)}; known: {list(MODALITIES)}"
        )
    for m, d in given.items():
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"dims[{m!r}] = {d!r}; expected a positive int")
    return {m: int(d) for m, d in given.items()}


def _resolve_dims(store: Path, given: dict[str, int], indexes: dict[str, dict[str, Path]],
                  folders: dict[str, Path | None], text_encoder: TextEncoder | None) -> dict[str, int] | None:  # fmt: skip
    """Dims for a new store (None when the store exists: its own dims are used)."""
    if text_encoder is not None and given.get("text", text_encoder.dim) != text_encoder.dim:
        raise ValueError(f"dims gives text = {given['text']}, but the text encoder "
                         f"{text_encoder.name} gives {text_encoder.dim}-d vectors")  # fmt: skip
    if (store / MANIFEST).exists():
        have = FeatureStore(store).dims
        differ = {m: d for m, d in given.items() if have[m] != d}
        if differ:
            raise ValueError(f"the store {store} has feature sizes {have}; dims gives {differ}")
        return None
    dims: dict[str, int] = {}
    for m in ("audio", "vision"):
        folder = folders[m]
        if m in given:
            dims[m] = given[m]
            if folder is not None:
                log.info("%s feature size D = %d (given)", m, dims[m])
        elif folder is None:
            dims[m] = DEFAULT_DIMS[m]
        elif not indexes[m]:
            raise ValueError(f"cannot tell the {m} feature size: no {m} feature file in {folder}; "
                             f"pass --dims {m}=D (in Python: dims={{'{m}': D}}) to create the store")  # fmt: skip
        else:
            dims[m] = _agreed_dim(m, indexes[m], folder)
    dims["text"] = (
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
            skipped, so an interrupted import resumes where it stopped, and a clip that
            failed is retried).
        text_encoder: encodes each transcript into the text vector (the offline MiniLM,
            the paper's GTE, ...); ``None`` imports no text (text missing for every clip,
            recorded in the store's provenance).
        audio_dir, vision_dir, text_dir: folders under ``root`` (or absolute paths); a
            folder given must exist; ``None`` leaves that modality missing for every clip.
        ids: the clips to import, in order; ``None``: every id with a file in any folder.
        dims: feature sizes for a new store, instead of the size most files agree on (see
            the module docstring); for a modality not imported the default is
            :data:`DEFAULT_DIMS` (the paper's). A file of another size is rejected. For an
            existing store they must equal its sizes. The text size is the encoder's.
        dtype: store dtype for a new store ("float16", the default, or "float32").
        batch_size: transcripts per text-encoder call.
        progress: show a progress bar.

    A clip whose files are all usable is written, with a modality missing where its file
    is absent (or its transcript empty); a clip with a rejected file is not written (see
    the module docstring). Every rejected file is in ``STORE/extract_errors.jsonl``. A
    clip with every file absent is still written: predictions need a row for every id.
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
    given = _check_given_dims(dims or {})
    folders = {
        "audio": _folder(root, audio_dir, "audio"),
        "vision": _folder(root, vision_dir, "vision"),
        "text": _folder(root, text_dir, "text"),
    }
    summary = ImportSummary(store=str(store), root=str(root),
                            text_encoder="none" if text_encoder is None else text_encoder.name)  # fmt: skip
    if text_encoder is None:
        log.info("no text encoder: text is missing for every clip (transcripts are not read)")
    indexes: dict[str, dict[str, Path]] = {}
    for m in MODALITIES:
        folder = folders[m]
        suffixes = (".txt",) if m == "text" else FEATURE_SUFFIXES
        indexes[m] = {} if folder is None else _index_folder(folder, suffixes, m, summary.errors)
    wanted = sorted(set().union(*indexes.values())) if ids is None else list(ids)
    summary.total = len(wanted)
    if not wanted:
        raise FileNotFoundError(
            f"no clips to import: no feature files in {', '.join(str(f) for f in folders.values() if f)}"
        )
    new_dims = _resolve_dims(store, given, indexes, folders, text_encoder)
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
            summary.dims = writer.dims
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
        summary.rejected = sum(e["path"] is not None for e in summary.errors)  # those naming a file
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
            _reject(summary.errors, None, None, None, "input", str(e))
            summary.failed += 1
            continue
        if clip_id in seen:
            _reject(
                summary.errors, clip_id, None, None, "input", f"clip id {clip_id!r} is listed twice"
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
                   limit: float, absent: list[dict], errors: list[dict]) -> np.ndarray | None:  # fmt: skip
    """A clip's (T, D) features of modality ``m``, or None: not imported, absent (noted
    in ``absent``) or rejected (recorded in ``errors``)."""
    if folder is None:
        return None
    path = index.get(clip_id)
    if path is None:
        absent.append({"clip_id": clip_id, "modality": m, "path": str(folder / f"{clip_id}.pkl")})
        return None
    try:
        arr = load_feature_pickle(path)  # (T, D)
    except (ValueError, OSError) as e:
        _reject(errors, clip_id, m, path, "read", str(e))
        return None
    if arr.shape[1] != dim:
        _reject(errors, clip_id, m, path, "read",
                f"{path}: shape {arr.shape}: D = {arr.shape[1]}, the store has {m} D = {dim}")  # fmt: skip
        return None
    peak = float(np.abs(arr).max())
    if peak > limit:
        _reject(errors, clip_id, m, path, "read", f"{path}: max |x| = {peak:g} does not fit the store's "
                f"dtype (largest {limit:g}); import into a float32 store")  # fmt: skip
        return None
    return arr


def _read_transcript(clip_id: str, index: dict[str, Path], folder: Path, absent: list[dict],
                     errors: list[dict]) -> str | None:  # fmt: skip
    """The transcript text ('' when empty), or None: absent (noted) or unreadable (rejected)."""
    path = index.get(clip_id)
    if path is None:
        absent.append(
            {"clip_id": clip_id, "modality": "text", "path": str(folder / f"{clip_id}.txt")}
        )
        return None
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        _reject(
            errors,
            clip_id,
            "text",
            path,
            "read",
            f"{path}: unreadable transcript: {type(e).__name__}: {e}",
        )
        return None


def _encode_texts(encoder: TextEncoder, texts: list[str], ids: list[str], folder: Path,
                  errors: list[dict]) -> list[np.ndarray | None]:  # fmt: skip
    """(D_t,) vectors of ``texts``; a batch that fails is retried text by text."""
    try:
        vecs, _ = encoder.encode(texts)  # (N, D_t)
        return list(vecs)
    except (ValueError, RuntimeError) as e:
        if len(texts) == 1:
            _reject(errors, ids[0], "text", folder / f"{ids[0]}.txt", "encode",
                    f"text encoder failed: {type(e).__name__}: {e}")  # fmt: skip
            return [None]
        log.warning(
            "a batch of %d transcripts failed to encode (%s); retrying one by one", len(texts), e
        )
        return [
            v for t, i in zip(texts, ids) for v in _encode_texts(encoder, [t], [i], folder, errors)
        ]


def _import(todo: list[str], writer: StoreWriter, indexes: dict[str, dict[str, Path]],
            folders: dict[str, Path | None], text_encoder: TextEncoder | None, batch_size: int,
            summary: ImportSummary, progress: bool, written: set[str]) -> None:  # fmt: skip
    dims = writer.dims
    limit = float(np.finfo(writer.dtype).max)  # largest value the store dtype holds
    transcripts_dir = writer.root / TRANSCRIPTS
    text_dir = folders["text"] if text_encoder is not None else None
    bar = tqdm(
        total=len(todo), desc="import", unit="clip", disable=not progress, dynamic_ncols=True
    )
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        errors: dict[str, list[dict]] = {c: [] for c in chunk}  # this chunk's, by clip
        absent: dict[str, list[dict]] = {c: [] for c in chunk}
        texts: list[str | None] = [None] * len(chunk)
        vecs: list[np.ndarray | None] = [None] * len(chunk)
        if text_encoder is not None and text_dir is not None:
            texts = [
                _read_transcript(c, indexes["text"], text_dir, absent[c], errors[c]) for c in chunk
            ]
            present = [k for k, t in enumerate(texts) if t]  # empty transcript: text missing
            failures: list[dict] = []
            encoded = _encode_texts(text_encoder, [str(texts[k]) for k in present],
                                    [chunk[k] for k in present], text_dir, failures) if present else []  # fmt: skip
            for e in failures:
                errors[e["clip_id"]].append(e)
            for k, v in zip(present, encoded):
                vecs[k] = v  # (D_t,)
        for k, clip_id in enumerate(chunk):
            # one clip's arrays at a time: at most two arrays at the size limit in memory
            seqs = {m: _load_sequence(clip_id, m, indexes[m], folders[m], dims[m], limit, absent[clip_id],
                                      errors[clip_id]) for m in ("audio", "vision")}  # fmt: skip
            if errors[clip_id]:  # a rejected file: not written, so the next run retries it
                summary.errors.extend(errors[clip_id])
                summary.failed += 1
                continue
            clip = ClipFeatures(clip_id, seqs["audio"], seqs["vision"], vecs[k])
            try:
                writer.add(clip)
            except ValueError as e:  # not expected: every array was checked above
                _reject(summary.errors, clip_id, None, None, "write", f"not written: {e}")
                summary.failed += 1
                continue
            text = texts[k]
            if text is not None:
                tmp = transcripts_dir / f"{clip_id}.txt.tmp"
                tmp.write_text(text + "\n", encoding="utf-8")
                os.replace(tmp, transcripts_dir / f"{clip_id}.txt")
            summary.done += 1
            summary.absent.extend(absent[clip_id])
            written.add(clip_id)
            for m, miss in zip(MODALITIES, clip.missing):
                summary.missing[m] += int(miss)
        bar.update(len(chunk))
        bar.set_postfix(failed=summary.failed)
    bar.close()


def _report(store: Path, summary: ImportSummary, written: set[str]) -> None:
    """Append this run's errors to ``STORE/extract_errors.jsonl`` and write
    ``STORE/import_report.json``: this run, plus the earlier runs' absent files of the clips
    in the store that this run did not write (so the report covers every clip)."""
    path = store / REPORT_FILE
    earlier: list[dict] = []
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            keep = set(FeatureStore(store).ids) - written
            earlier = [a for a in old.get("absent", []) if a.get("clip_id") in keep]
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("%s: earlier report unreadable (%s); it is replaced", path, e)
    if summary.errors:
        errors_file = store / ERRORS_FILE
        with open(errors_file, "a", encoding="utf-8") as fh:
            fh.writelines(
                json.dumps({**e, "run": summary.started}, ensure_ascii=True) + "\n"
                for e in summary.errors
            )
        summary.errors_file = str(errors_file)
    for m, n in sorted(Counter(a["modality"] for a in summary.absent).items()):
        log.info("%d clip(s) have no %s file: %s is missing for them (listed in %s)", n, m, m, path)
    summary.absent[:0] = earlier
    summary.report_file = str(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**asdict(summary), "ok": summary.ok}, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def summary_line(summary: ImportSummary) -> str:
    """One line of counts, for the CLI."""
    miss = summary.missing
    return (
        f"{summary.done} imported, {summary.skipped} skipped, {summary.failed} failed, "
        f"{summary.rejected} file(s) rejected; missing: audio {miss['audio']}, vision "
        f"{miss['vision']}, text {miss['text']}; {summary.wall_seconds:.1f} s"
    )
