"""Performance changes to the fusion model must compute the same function.

:class:`taemi.model.taemi.CrossAttention` (values pooled with the attention weights before
their projection, equal scores for missing samples) is checked against the release's
cross-attention written plainly (K and V projected over the whole sequence, the missing
token substituted into both, fused attention; outputs and every parameter's gradient), at
tiny and at paper width, with and without missing tokens. In fp32 they must agree to float
tolerance; under bf16 autocast each is compared with the fp32 result and the rewrite must
be as accurate as the plain form (bf16 rounds at different places in the two)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from taemi.config import preset
from taemi.data.batch import Batch
from taemi.model.taemi import TAEMI, CrossAttention, PaddedSequence


def separate_kv_forward(
    self: CrossAttention, query: torch.Tensor, kv: PaddedSequence
) -> torch.Tensor:
    """The release's cross-attention written plainly: k and v from two separate projections."""
    B, T, _ = kv.x.shape
    h = self.heads
    q = self.ln_q(self.q_proj(query)).view(B, h, 1, -1)  # (B, h, 1, hd)
    k = self.ln_kv(kv.project(self.k_proj)).view(B, T, h, -1).transpose(1, 2)  # (B, h, T, hd)
    v = kv.project(self.v_proj).view(B, T, h, -1).transpose(1, 2)  # (B, h, T, hd)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=kv.mask.view(B, 1, 1, T)
    )  # (B, h, 1, hd)
    return self.out_proj(out.reshape(B, -1))  # (B, H)


def _batch(
    dims: dict[str, int], lengths: list[tuple[int, int]], missing: list[tuple[bool, bool, bool]]
) -> Batch:
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
    "tiny": dict(
        audio_dim=7, vision_dim=5, text_dim=6, hidden=8, heads=2, sa_ffn=16, head_hidden=8
    ),
    "paper_width": {},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("size", list(CASES))
@pytest.mark.parametrize("name", ["paper", "official", "anchor_audio"])
def test_cross_attention_equals_the_plain_release_form(
    name: str, size: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = dataclasses.replace(
        preset(name).model,
        **CASES[size],
        modality_dropout=0.0,
        attn_dropout=0.0,
        sa_dropout=0.0,
        head_dropout=0.0,
    )
    torch.manual_seed(0)
    model = TAEMI(cfg).train()
    dims = model.dims
    lengths = [(6, 4), (3, 5), (5, 1), (2, 2)] if size == "tiny" else [(40, 20), (31, 25), (12, 9)]
    missing = [
        (False, False, False),
        (True, False, False),
        (False, True, True),
        (False, False, False),
    ][: len(lengths)]
    batch = _batch(dims, lengths, missing)

    def run(forward, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(CrossAttention, "forward", forward)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(batch).float()
        out.square().sum().backward()
        return out.detach(), {
            k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None
        }

    fast_forward = CrossAttention.forward
    ref_out, ref_grads = run(separate_kv_forward, bf16=False)
    out, grads = run(fast_forward, bf16=precision == "bf16")
    assert set(grads) == set(ref_grads)
    scales = {k: g.abs().max().clamp_min(1e-3) for k, g in ref_grads.items()}
    # The keys' LayerNorm bias shifts every score of a head by the same amount, which the
    # softmax ignores: its exact gradient is zero and both forms give only rounding noise.
    # It must stay noise (small next to the LayerNorm weight's gradient); it is not compared.
    for k in [k for k in grads if k.endswith("ln_kv.bias")]:
        weight_scale = ref_grads[k.replace(".bias", ".weight")].abs().max()
        assert grads.pop(k).abs().max() <= 0.05 * weight_scale, k
    if precision == "fp32":
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for k, g in grads.items():
            torch.testing.assert_close(
                g / scales[k], ref_grads[k] / scales[k], rtol=1e-5, atol=1e-5, msg=k
            )
        return
    plain_out, plain_grads = run(separate_kv_forward, bf16=True)
    assert (out - ref_out).abs().max() <= 2 * (plain_out - ref_out).abs().max() + 1e-3
    for k, g in grads.items():
        err = ((g - ref_grads[k]).abs().max() / scales[k]).item()
        plain_err = ((plain_grads[k] - ref_grads[k]).abs().max() / scales[k]).item()
        assert err <= 2 * plain_err + 2e-2, (k, err, plain_err)
