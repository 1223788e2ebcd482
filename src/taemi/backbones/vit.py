"""ViT-B/16 (ImageNet-21k): the paper profile's image encoder (docs/method.md section 3).

``google/vit-base-patch16-224-in21k`` (A. Dosovitskiy et al., "An Image is Worth 16x16
Words", ICLR 2021) -> (768,) per face image: the mean of the last hidden state over all
tokens. Frozen only (the release does not fine-tune its vision backbone). Weights are
located by :mod:`taemi.backbones.weights`. Importing this module needs ``transformers``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

try:
    from transformers import ViTImageProcessorPil, ViTModel
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taemi.backbones.vit needs transformers>=5: pip install transformers"
    ) from exc

from taemi.backbones.base import as_torch_device, as_torch_dtype, check_batch_size
from taemi.backbones.weights import (
    VIT_B16_IN21K,
    hub_revision,
    load_config,
    load_model,
    load_pretrained,
    locate,
)


class ViTImageEncoder:
    """One vector per face image: the mean of ViT's last hidden state over ALL tokens.

    "Mean of the last hidden state over tokens" (docs/method.md section 3) is taken literally: the
    CLS token and all 196 patch tokens (224 / 16 = 14 x 14) are averaged, i.e.
    ``last_hidden_state.mean(dim=1)`` (the final layer norm is part of ViTModel's last
    hidden state). The pooler (``add_pooling_layer=False``) is not used; its checkpoint
    tensors are ignored.

    Preprocessing is the checkpoint's own ViTImageProcessor configuration run on the PIL
    backend (``ViTImageProcessorPil``): resize to the model's size (224 x 224, bilinear,
    aspect ratio NOT kept, as the original processor does), rescale to [0, 1], normalise
    with mean = std = 0.5. The PIL backend is chosen explicitly so the numbers do not
    depend on whether torchvision happens to be installed (transformers 5 otherwise picks
    a torchvision backend when it is).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = VIT_B16_IN21K,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        self.device = as_torch_device(device)
        self.dtype = as_torch_dtype(dtype)
        self.batch_size = check_batch_size(batch_size)
        loc = locate(source, cache_dir)
        config = load_config(loc, allow_download, "vit")
        self.processor: ViTImageProcessorPil = load_pretrained(
            loc, allow_download, ViTImageProcessorPil.from_pretrained
        )
        self.model: ViTModel = load_model(
            loc, allow_download, ViTModel, config=config, add_pooling_layer=False, dtype=self.dtype
        )
        self.model.to(self.device).eval()
        self.name = loc.source
        self.dim = int(self.model.config.hidden_size)
        self.settings: dict[str, Any] = {
            "pooling": "mean over all tokens (CLS + patches) of the last hidden state",
            "image_size": self.model.config.image_size,
            "processor": "ViTImageProcessorPil",
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if (rev := hub_revision(self.model.config)) is not None:
            self.settings["revision"] = rev

    @staticmethod
    def _check(images: list[np.ndarray]) -> list[np.ndarray]:
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of (H, W, 3) uint8 arrays, got {type(images)}")
        for i, im in enumerate(images):
            if (
                not isinstance(im, np.ndarray)
                or im.dtype != np.uint8
                or im.ndim != 3
                or im.shape[2] != 3
            ):
                raise ValueError(
                    f"image {i}: expected an RGB uint8 array (H, W, 3), got "
                    f"{getattr(im, 'shape', type(im))} {getattr(im, 'dtype', '')}"
                )
            if im.shape[0] < 1 or im.shape[1] < 1:
                raise ValueError(f"image {i}: empty image of shape {im.shape}")
        return list(images)

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images (H, W, 3), any size -> (N, dim) float32."""
        images = self._check(images)
        out = np.zeros((len(images), self.dim), dtype=np.float32)  # (N, D)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = self.processor(
                images=chunk, return_tensors="pt"
            ).pixel_values  # (b, 3, 224, 224)
            hidden = self.model(pixels.to(self.device, self.dtype)).last_hidden_state  # (b, 1+P, D)
            out[start : start + len(chunk)] = hidden.float().mean(dim=1).cpu().numpy()  # (b, D)
        return out
