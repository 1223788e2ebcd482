"""The TAEMI fusion model and its ablation variants, in one file.

Zhu et al., "Anchoring Emotions in Text: Robust Multimodal Fusion for Mimicry
Intensity Estimation", arXiv 2603.14976 (ABAW 10th EMI, first place), section 3,
plus the authors' release (docs/method.md sections 4-5).

Data flow for the default (``paper``) configuration, B clips per batch::

    audio  (B, T_a, 1027) --missing token--> Linear -> SelfAttention --\\
    vision (B, T_v, 768)  --missing token--> Linear -> SelfAttention ---+-- CA(query = t) -> h_a, h_v (B, 512)
    text   (B, 768)       --missing token--> t ------------------------/
    f = [t ; h_a ; h_v]  (B, 1792)  ->  Linear -> GELU -> Dropout -> Linear  ->  (B, 6)

Variants are configuration (:class:`taemi.config.ModelConfig`), not copies:

- ``align=False`` (the release, preset ``official``): no projection/self-attention;
  the cross-attention blocks project straight from the raw feature sizes.
- ``fusion="self_attention"``: projection + self-attention, then masked mean pooling
  instead of cross-attention (paper Table 3, "w/o text-anchored CA").
- ``fusion="concat"``: projection only, masked mean pooling, concatenation
  (Table 3, "simple concat").
- ``anchor="audio"|"vision"``: the anchor's masked mean (raw features) is the query
  and the two other modalities are keys/values; text as keys/values is its token
  states when given, else the text vector as a one-step sequence (Table 4).
- ``missing_tokens="zeros"``: missing modalities become fixed zero vectors instead of
  learned tokens; ``modality_dropout=0`` disables modality dropout.

Missing-modality semantics (docs/method.md section 5): a missing modality's RAW features are
replaced by its token, broadcast over time, before any projection, and every time
step then counts as valid. Masks are boolean, ``True`` = a real (valid) step.

How that is computed: the first operation on every raw sequence is position-wise or a
weighted sum over time (a Linear: ``ModalityEncoder.proj``; the release's cross-attention,
whose keys are a Linear and whose values are pooled with the attention weights before
their projection; a non-text anchor's masked mean). So ``Linear(where(m, token, x)) ==
where(m, Linear(token), Linear(x))``, a weighted sum of a broadcast token is the token
times the weights' sum, and keys that are all the token's give equal scores: the model
projects (or pools) the raw ``x`` and handles the token separately per sample
(:func:`project_with_token`, :class:`PaddedSequence`, :class:`CrossAttention`). The result
is the same, but the raw ``x`` never depends on a parameter, so backward never computes
the gradient of a whole (B, T, 1027) input (a third of the release's training FLOPs when
substituting first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taemi import MODALITIES
from taemi.config import ModelConfig
from taemi.data.batch import Batch


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid time steps: (B, T, D), (B, T) -> (B, D)."""
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def project_with_token(linear: nn.Linear, x: Tensor, token: Tensor, missing: Tensor) -> Tensor:
    """``linear`` of ``x`` with missing samples' rows replaced by ``token``, substituted AFTER.

    x (B, T, D), token (D,), missing (B,) -> (B, T, H). Equals
    ``linear(torch.where(missing, token, x))``, but ``x`` gets no gradient path: backward
    computes the weight gradient of ``linear(x)`` and the token's gradient through a
    single projected row, never a (B, T, D) input gradient. The zero-buffer tokens
    project to ``linear.bias``, as a zero input does.
    """
    y = linear(x)  # (B, T, H)
    projected_token = linear(token)  # (H,): one row, whatever B and T (autocast casts both)
    return torch.where(missing.view(-1, 1, 1), projected_token, y)


@dataclass
class PaddedSequence:
    """A padded (B, T, D) sequence, and the missing token still to substitute, if any.

    From :meth:`MissingTokens.fill_sequence`, ``x`` is RAW features and missing samples
    are replaced by ``token`` at the first operation, :meth:`project` or :meth:`mean`
    (see the module docstring). From a :class:`ModalityEncoder`, ``x`` is already
    substituted and ``token``/``missing`` are None.
    """

    x: Tensor  # (B, T, D); rows of missing samples are ignored when token is set
    mask: Tensor  # (B, T) bool; all True for missing samples (every token step is valid)
    token: Tensor | None = None  # (D,) missing token to substitute, None when done
    missing: Tensor | None = None  # (B,) bool, which samples take the token

    def project(self, linear: nn.Linear) -> Tensor:
        """Position-wise ``linear`` of the (substituted) sequence: -> (B, T, H)."""
        if self.token is None:
            return linear(self.x)
        return project_with_token(linear, self.x, self.token, self.missing)

    def pool(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Weighted sums over time of the (substituted) sequence, one per weight column.

        weights (B, T, n) -> ``sum_t w[:, t, j] * x[:, t]`` (B, n, D) and the weights' mass
        ``sum_t w[:, t, j]`` (B, n). A missing sample's sum is its token times the mass.
        """
        pooled = torch.bmm(weights.transpose(1, 2).to(self.x.dtype), self.x)  # (B, n, D)
        mass = weights.sum(1)  # (B, n)
        if self.token is None:
            return pooled, mass
        token = self.token.to(pooled.dtype) * mass.unsqueeze(-1).to(pooled.dtype)  # (B, n, D)
        return torch.where(self.missing.view(-1, 1, 1), token, pooled), mass

    def mean(self) -> Tensor:
        """Masked mean over time of the (substituted) sequence: -> (B, D)."""
        pooled = masked_mean(self.x, self.mask)  # (B, D)
        if self.token is None:
            return pooled
        return torch.where(self.missing.view(-1, 1), self.token.to(pooled.dtype), pooled)


class MissingTokens(nn.Module):
    """One replacement vector per modality for missing inputs (docs/method.md section 5).

    ``learned=True``: parameters initialised N(0, std^2). ``learned=False``: fixed
    zero buffers (the paper's "w/o learnable missing tokens" ablation), so the
    variant has no token parameters at all.
    """

    def __init__(self, dims: dict[str, int], learned: bool = True, std: float = 0.02):
        super().__init__()
        self.learned = learned
        for name, dim in dims.items():
            if learned:
                self.register_parameter(name, nn.Parameter(torch.randn(dim) * std))
            else:
                self.register_buffer(name, torch.zeros(dim), persistent=False)

    def fill_sequence(self, name: str, x: Tensor, mask: Tensor, missing: Tensor) -> PaddedSequence:
        """Missing samples' sequences become the token broadcast over time.

        x (B, T, D), mask (B, T), missing (B,) -> a :class:`PaddedSequence` that
        substitutes the token at its first projection or pooling; its mask is all True
        for missing samples.
        """
        mask = mask | missing.view(-1, 1)  # (B, T): every step of a token sequence is valid
        return PaddedSequence(x, mask, token=getattr(self, name), missing=missing)

    def fill_vector(self, name: str, x: Tensor, missing: Tensor) -> Tensor:
        """x (B, D), missing (B,) -> (B, D)."""
        token = getattr(self, name).to(x.dtype)
        return torch.where(missing.view(-1, 1), token.expand_as(x), x)


class SelfAttentionLayer(nn.Module):
    """One post-norm transformer encoder layer (attention + feed-forward), padding-masked.

    The paper's step-1 "self-attention layer per modality"; its inner layout is not
    given, so this follows ``nn.TransformerEncoderLayer``'s defaults (post-norm,
    GELU here, feed-forward ``ffn`` wide). Uses fused scaled-dot-product attention.
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim)
        )
        self.ln2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, H), mask (B, T) -> (B, T, H)."""
        B, T, H = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        )  # 3 x (B, h, T, hd)
        attn = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask.view(B, 1, 1, T),
            dropout_p=self.attn_dropout if self.training else 0.0,
        )  # (B, h, T, hd)
        attn = attn.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
        x = self.ln1(x + self.dropout(self.out_proj(attn)))
        return self.ln2(x + self.dropout(self.ffn(x)))


class ModalityEncoder(nn.Module):
    """Step 1 (alignment): Linear(D -> H), then optionally one self-attention layer."""

    def __init__(self, proj: nn.Linear, self_attention: SelfAttentionLayer | None):
        super().__init__()
        self.proj = proj
        self.self_attention = self_attention

    def forward(self, seq: PaddedSequence) -> PaddedSequence:
        """x (B, T, D), mask (B, T) -> x (B, T, H), same mask; the missing token is substituted."""
        x = seq.project(self.proj)  # (B, T, H)
        if self.self_attention is not None:
            x = self.self_attention(x, seq.mask)
        return PaddedSequence(x, seq.mask)


class CrossAttention(nn.Module):
    """Single-query multi-head cross-attention as released (docs/method.md section 4.2).

    ``q = LN(W_q a)``, ``k = LN(W_k X)``, ``v = W_v X``; scores scaled by
    sqrt(head_dim), padded keys masked, softmax, attention dropout, output
    projection. No residual, no feed-forward. Parameter names follow the release.

    How it is computed (the same function, with about half the release's FLOPs). With a
    single query, head j's output is ``sum_t a_jt (W_vj x_t + b_vj) = W_vj (sum_t a_jt
    x_t) + b_vj sum_t a_jt``: the sequence is pooled with the attention weights FIRST and
    only the (B, heads, D) pooled vectors are projected, so no (B, T, H) value tensor is
    ever computed (forward, or its weight gradient in backward). For the release (no
    alignment, raw X of size 1027 / 768) the values were half of all training FLOPs.
    Attention dropout acts on the weights before pooling, as in the release's
    ``dropout(softmax(.)) @ v``. Each head's scores are an elementwise product with its
    query slice summed over the slice, read straight from the keys' (B, T, H) layout: no
    transposed copies (SDPA needs them; one batched product with a block-diagonal query
    does not either, and timed the same in a full training step).

    Missing samples (``kv.token`` set: raw X whose missing samples take the token): the
    values pool the token (:meth:`PaddedSequence.pool`). Their keys would all be the
    token's key, so their scores are equal and their attention is uniform over their
    (all-valid) steps: the scores are set to a constant instead of projecting the token
    through ``W_k``, which is the same softmax and the same gradients (equal keys get
    gradients that sum to zero).
    """

    def __init__(self, query_dim: int, kv_dim: int, hidden: int, heads: int, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(query_dim, hidden)
        self.k_proj = nn.Linear(kv_dim, hidden)
        self.v_proj = nn.Linear(kv_dim, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.ln_q = nn.LayerNorm(hidden)
        self.ln_kv = nn.LayerNorm(hidden)
        self.attn_dropout = attn_dropout

    def forward(
        self, query: Tensor, kv: PaddedSequence, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """query (B, D_q), kv: x (B, T, D_kv), mask (B, T) -> (B, H).

        ``return_weights``: also the attention weights averaged over the heads, (B, T),
        taken before attention dropout: 0 at padded steps, each row sums to 1 (uniform over
        all steps for a missing sample's token sequence)."""
        B, _, D = kv.x.shape
        h = self.heads
        hd = self.v_proj.out_features // h
        q = self.ln_q(self.q_proj(query))  # (B, H)
        k = self.ln_kv(self.k_proj(kv.x))  # (B, T, H); a missing sample's rows are unused
        q = (q * hd**-0.5).view(B, 1, h, hd)  # scaled once here, not per score
        scores = (k.view(B, -1, h, hd) * q).sum(-1)  # (B, T, h): each head's dot products
        if kv.token is not None:
            scores = scores.masked_fill(kv.missing.view(B, 1, 1), 0.0)  # token keys: equal scores
        scores = scores.masked_fill(~kv.mask.unsqueeze(-1), float("-inf"))
        weights = scores.softmax(dim=1)  # (B, T, h)
        attn = F.dropout(weights, self.attn_dropout, self.training)  # (B, T, h)
        pooled, mass = kv.pool(attn)  # (B, h, D), (B, h)
        w_v = self.v_proj.weight.view(h, hd, D).transpose(1, 2)  # (h, D, hd): head j's W_v rows
        heads = torch.bmm(pooled.transpose(0, 1), w_v.to(pooled.dtype)).transpose(
            0, 1
        )  # (B, h, hd)
        heads = heads + self.v_proj.bias.view(h, hd) * mass.unsqueeze(-1)  # (B, h, hd)
        out = self.out_proj(heads.reshape(B, -1))  # (B, H)
        if return_weights:
            return out, weights.mean(dim=-1)  # (B, H), (B, T)
        return out


class TAEMI(nn.Module):
    """Text-anchored multimodal fusion (and its ablation variants).

    ``forward(batch) -> (B, num_outputs)`` raw intensities (no sigmoid, no clipping).
    Submodules, by configuration:

    - ``missing``: :class:`MissingTokens` for audio, vision, text.
    - ``enc_<m>``: :class:`ModalityEncoder` for each non-anchor modality ``m`` when
      ``fusion`` is ``concat``/``self_attention`` or ``align`` is on.
    - ``ca_<m>``: :class:`CrossAttention` for each non-anchor modality (``fusion="cross_attention"``).
    - ``pred_head``: Linear -> GELU -> Dropout -> Linear (indices 0 and 3 hold weights, as released).
    """

    def __init__(self, cfg: ModelConfig, num_outputs: int = 6):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.num_outputs = num_outputs
        dims = {"audio": cfg.audio_dim, "vision": cfg.vision_dim, "text": cfg.text_dim}
        self.dims = dims
        self.anchor = cfg.anchor
        self.others = tuple(
            m for m in MODALITIES if m != cfg.anchor
        )  # keys/values, in modality order

        self.missing = MissingTokens(
            dims, learned=cfg.missing_tokens == "learned", std=cfg.token_init_std
        )

        encode = cfg.fusion != "cross_attention" or cfg.align
        with_sa = cfg.fusion in ("cross_attention", "self_attention")
        for m in self.others:
            if encode:
                sa = (
                    SelfAttentionLayer(
                        cfg.hidden, cfg.heads, cfg.sa_ffn, cfg.sa_dropout, cfg.attn_dropout
                    )
                    if with_sa
                    else None
                )
                self.add_module(f"enc_{m}", ModalityEncoder(nn.Linear(dims[m], cfg.hidden), sa))
            if cfg.fusion == "cross_attention":
                kv_dim = cfg.hidden if encode else dims[m]
                ca = CrossAttention(
                    dims[cfg.anchor], kv_dim, cfg.hidden, cfg.heads, cfg.attn_dropout
                )
                self.add_module(f"ca_{m}", ca)

        # every non-anchor modality contributes H: a CA output or a pooled projection
        fused = dims[cfg.anchor] + len(self.others) * cfg.hidden  # 768 + 512 + 512 = 1792 (paper)
        self.fused_dim = fused
        self.pred_head = nn.Sequential(
            nn.Linear(fused, cfg.head_hidden),
            nn.GELU(),
            nn.Dropout(cfg.head_dropout),
            nn.Linear(cfg.head_hidden, num_outputs),
        )

    # -- inputs ------------------------------------------------------------------

    def modality_dropout(self, missing: Tensor) -> Tensor:
        """Training only: drop each modality of each sample independently with prob. p.

        missing (B, 3) bool -> (B, 3) bool; all three may be dropped at once.
        """
        p = self.cfg.modality_dropout
        if not self.training or p <= 0:
            return missing
        return missing | (torch.rand(missing.shape, device=missing.device) < p)

    def _sequences(self, batch: Batch, missing: Tensor) -> dict[str, PaddedSequence]:
        """Per modality, x (B, T, D) and mask (B, T) with its missing token attached."""
        seqs = {
            "audio": (batch.audio, batch.audio_mask),
            "vision": (batch.vision, batch.vision_mask),
        }
        if batch.text_tokens is not None:
            if batch.text_tokens_mask is None:
                raise ValueError("batch.text_tokens is given without batch.text_tokens_mask")
            seqs["text"] = (batch.text_tokens, batch.text_tokens_mask)
        else:
            seqs["text"] = (
                batch.text.unsqueeze(1),
                torch.ones_like(batch.text[:, :1], dtype=torch.bool),
            )
        return {
            m: self.missing.fill_sequence(m, *seqs[m], missing[:, i])
            for i, m in enumerate(MODALITIES)
        }

    # -- forward -----------------------------------------------------------------

    def forward(
        self, batch: Batch, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """-> (B, num_outputs) raw intensities.

        ``return_attention`` (inference: ``taemi serve``): also, per non-anchor modality of a
        ``fusion="cross_attention"`` model, its cross-attention weights averaged over the
        heads, (B, T_m) (see :meth:`CrossAttention.forward`); an empty dict for the other
        fusions. The outputs are the same either way."""
        missing = self.modality_dropout(batch.missing)  # (B, 3)
        seqs = self._sequences(batch, missing)
        text = self.missing.fill_vector("text", batch.text, missing[:, 2])  # (B, D_t)

        if self.anchor == "text":
            query = text  # (B, D_t), enters un-projected
        else:
            query = seqs[self.anchor].mean()  # (B, D_anchor), raw features pooled

        parts = [query]
        attention: dict[str, Tensor] = {}
        for m in self.others:
            seq = seqs[m]  # raw: x (B, T, D_m)
            enc = getattr(self, f"enc_{m}", None)
            if enc is not None:
                seq = enc(seq)  # x (B, T, H)
            if self.cfg.fusion != "cross_attention":
                parts.append(seq.mean())  # (B, H)
            elif return_attention:
                h, attention[m] = getattr(self, f"ca_{m}")(query, seq, return_weights=True)
                parts.append(h)  # (B, H); weights (B, T_m)
            else:
                parts.append(getattr(self, f"ca_{m}")(query, seq))  # (B, H)
        f = torch.cat(parts, dim=-1)  # (B, fused_dim), 1792 for the paper preset
        out = self.pred_head(f)  # (B, num_outputs)
        return (out, attention) if return_attention else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
