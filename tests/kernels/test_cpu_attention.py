"""dlmc_cpu.attention against float64 attention and ATen's bf16 SDPA, within what bf16 rounding allows.

The kernel rounds what ATen's flash kernel rounds: the probabilities to bf16 for P.V (relative error at most
u = 2^-8 each) and the output once (u again). So its output is within 2u * max|v| of exact attention, plus
fp32 sums that are far smaller; any wrong key, head, mask or scale is off by O(|v|)."""

import pytest
import torch
import torch.nn.functional as F

from dlmc.errors import DlmcError
from dlmc.kernels import cpu_attention

U = 2.0**-8  # bf16's unit roundoff
needs_kernel = pytest.mark.skipif(bool(cpu_attention.missing_cpu_flags()),
                                  reason=f"this CPU lacks {cpu_attention.missing_cpu_flags()} (the kernel's instructions)")


def exact(q, k, v, mask, scale):
    """float64 attention of the bf16 inputs; grouped K/V heads repeated; [B, H, Lq, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, scale=scale)


def bound(v: torch.Tensor) -> float:
    return 2.2 * U * float(v.float().abs().max())


def inputs(B, H, Hk, Lq, Lk, D, seed=0, layout="bhld"):
    g = torch.Generator().manual_seed(seed)

    def make(heads, length):
        if layout == "blhd":  # the model's projections viewed as [B, H, L, D]: strided, last dim contiguous
            return torch.randn(B, length, heads, D, generator=g).bfloat16().transpose(1, 2)
        return torch.randn(B, heads, length, D, generator=g).bfloat16()

    return make(H, Lq), make(Hk, Lk), make(Hk, Lk)


@needs_kernel
@pytest.mark.parametrize("shape", [
    (1, 4, 4, 64, 64, 64),  # whole tiles
    (2, 4, 2, 37, 45, 24),  # tails everywhere, grouped K/V heads
    (1, 2, 1, 5, 130, 30),  # a key tail past two column tiles
    (1, 2, 2, 3, 7, 15),  # an odd head dim
    (1, 2, 2, 33, 200, 128),  # the head dim of larger models
])
@pytest.mark.parametrize("masking", ["none", "keys", "random"])
def test_matches_exact_attention_within_bf16_rounding(shape, masking):
    cpu_attention.load()
    B, H, Hk, Lq, Lk, D = shape
    q, k, v = inputs(*shape, layout="blhd" if D % 2 == 0 else "bhld")
    g = torch.Generator().manual_seed(1)
    mask = None
    if masking == "keys":  # key padding, as the model's [B, 1, Lq, Lk] view of a [B, Lk] mask
        mask = (torch.rand(B, 1, 1, Lk, generator=g) > 0.3).expand(B, 1, Lq, Lk).clone()
        mask[..., -1] = True
    elif masking == "random":  # per head and query
        mask = torch.rand(B, H, Lq, Lk, generator=g) > 0.5
        mask[..., 0] = True
    scale = D**-0.5
    out = cpu_attention.attention(q, k, v, mask, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (B, H, Lq, D) and out.is_contiguous()
    expected = exact(q, k, v, mask, scale)
    assert (out.double() - expected).abs().max() <= bound(v)
    if H == Hk:  # ATen's kernel, the one the pass replaces, is as far
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        assert (sdpa.double() - expected).abs().max() <= bound(v)


@needs_kernel
def test_masked_keys_never_contribute_and_scale_is_taken():
    cpu_attention.load()
    q, k, v = inputs(1, 2, 2, 9, 70, 32, seed=3)
    mask = torch.ones(1, 2, 9, 70, dtype=torch.bool)
    mask[..., 20:50] = False
    v[:, :, 20:50] = 1e4  # would dominate every output if a masked key leaked in
    out = cpu_attention.attention(q, k, v, mask, 1.0)
    allowed = torch.cat([v[:, :, :20], v[:, :, 50:]], 2)
    assert (out.double() - exact(q, k, v, mask, 1.0)).abs().max() <= bound(allowed)


@needs_kernel
def test_a_query_that_sees_no_key_gets_zeros():
    cpu_attention.load()
    q, k, v = inputs(1, 1, 1, 4, 16, 32)
    mask = torch.ones(1, 1, 4, 16, dtype=torch.bool)
    mask[0, 0, 2] = False
    out = cpu_attention.attention(q, k, v, mask, 0.5)
    assert torch.equal(out[0, 0, 2], torch.zeros(32, dtype=torch.bfloat16))
    assert torch.isfinite(out.float()).all()


@needs_kernel
def test_bad_inputs_are_refused():
    cpu_attention.load()
    q, k, v = inputs(1, 2, 2, 4, 8, 16)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        cpu_attention.attention(q.float(), k, v, None, 0.25)
    with pytest.raises(RuntimeError, match="the mask must be bool"):
        cpu_attention.attention(q, k, v, torch.zeros(1, 1, 4, 8), 0.25)


def test_a_cpu_without_the_instructions_gets_one_line(monkeypatch):
    monkeypatch.setattr(cpu_attention, "missing_cpu_flags", lambda: ["avx512_bf16"])
    cpu_attention.load.cache_clear()
    try:
        with pytest.raises(DlmcError, match="this CPU lacks avx512_bf16"):
            cpu_attention.load()
    finally:
        cpu_attention.load.cache_clear()


def test_the_fake_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 5, 8, dtype=torch.bfloat16), torch.empty(2, 2, 7, 8, dtype=torch.bfloat16), \
            torch.empty(2, 2, 7, 8, dtype=torch.bfloat16)
        out = cpu_attention.attention(q, k, v, None, 1.0)
    assert out.shape == (2, 4, 5, 8) and out.dtype == torch.bfloat16
