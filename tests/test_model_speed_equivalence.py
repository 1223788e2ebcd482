"""Performance changes to the fusion model must compute the same function.

:class:`taemi.model.taemi.CrossAttention` is checked against the release's cross-attention
written plainly (K and V from two separate projections; outputs and every parameter's
gradient), at tiny and at paper width, with and without missing tokens, in fp32 and under
bf16 autocast. (A fused K/V product was tried in issue 7 and measured slower on CPU:
``benchmarks/README.md``; this test guards any later rewrite.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from taemi.config import preset
from taemi.model.taemi import TAEMI, Batch, CrossAttention, PaddedSequence


def separate_kv_forward(self: CrossAttention, query: torch.Tensor, kv: PaddedSequence) -> torch.Tensor:
    """The release's cross-attention written plainly: k and v from two separate projections."""
    B, T, _ = kv.x.shape
    h = self.heads
    q = self.ln_q(self.q_proj(query)).view(B, h, 1, -1)  # (B, h, 1, hd)
    k = self.ln_kv(kv.project(self.k_proj)).view(B, T, h, -1).transpose(1, 2)  # (B, h, T, hd)
    v = kv.project(self.v_proj).view(B, T, h, -1).transpose(1, 2)  # (B, h, T, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=kv.mask.view(B, 1, 1, T))  # (B, h, 1, hd)
    return self.out_proj(out.reshape(B, -1))  # (B, H)


def _batch(dims: dict[str, int], lengths: list[tuple[int, int]], missing: list[tuple[bool, bool, bool]]) -> Batch:
    g = torch.Generator().manual_seed(0)
    B, Ta, Tv = len(lengths), max(a for a, _ in lengths), max(v for _, v in lengths)
    return Batch(
        audio=torch.randn(B, Ta, dims["audio"], generator=g),  # (B, T_a, D_a)
        audio_mask=torch.arange(Ta) < torch.tensor([a for a, _ in lengths])[:, None],
        vision=torch.randn(B, Tv, dims["vision"], generator=g),  # (B, T_v, D_v)
        vision_mask=torch.arange(Tv) < torch.tensor([v for _, v in lengths])[:, None],
        text=torch.randn(B, dims["text"], generator=g),
        missing=torch.tensor(missing),
    )


CASES = {
    "tiny": dict(audio_dim=7, vision_dim=5, text_dim=6, hidden=8, heads=2, sa_ffn=16, head_hidden=8),
    "paper_width": {},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("size", list(CASES))
@pytest.mark.parametrize("name", ["paper", "official", "anchor_audio"])
def test_cross_attention_equals_the_plain_release_form(
    name: str, size: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = dataclasses.replace(preset(name).model, **CASES[size], modality_dropout=0.0, attn_dropout=0.0,
                              sa_dropout=0.0, head_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = TAEMI(cfg).train()
    dims = model.dims
    lengths = [(6, 4), (3, 5), (5, 1), (2, 2)] if size == "tiny" else [(40, 20), (31, 25), (12, 9)]
    missing = [(False, False, False), (True, False, False), (False, True, True), (False, False, False)][: len(lengths)]
    batch = _batch(dims, lengths, missing)
    outs, grads = [], []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(CrossAttention, "forward", separate_kv_forward)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(batch).float()
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    assert set(grads[0]) == set(grads[1])
    for k, g in grads[0].items():
        scale = grads[1][k].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(g / scale, grads[1][k] / scale, **tol, msg=k)
