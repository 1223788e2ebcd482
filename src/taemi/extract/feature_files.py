"""The organisers' per-clip feature files, read without running their code.

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
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import contextvars
import functools
import io
import math
import operator
import os
import pickle
import re
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "ALLOWED_GLOBALS",
    "ARRAY_KEYS",
    "MAX_FEATURE_BYTES",
    "MAX_FEATURE_ELEMENTS",
    "MAX_FEATURE_FILE_BYTES",
    "FeatureTooLargeError",
    "UnsafePickleError",
    "load_feature_pickle",
]

#: Dict keys naming the features when a file holds a dict.
ARRAY_KEYS = ("features", "feature", "feats", "feat")

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
_FILE_BYTES: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "_FILE_BYTES", default=None
)

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
