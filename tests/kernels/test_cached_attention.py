import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.kernels.cached_attention import cached_attention, cached_attention_reference, cached_attention_triton
from tests.helpers import rounding_tolerance
from tests.kernels.conftest import needs_triton

B, LAYERS = 2, 3


def inputs(heads, kv_heads, length, cache, dim, dtype=torch.float32, seed=0):
    """Fresh q/k/v, one layer's view into a [layers, B, kv_heads, C, D] cache buffer, and a key mask whose
    second row hides the whole cache and some fresh keys (its hidden queries then see only themselves)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, length, dim, generator=g).to(dtype)  # [B, H, L, D]
    k, v = (torch.randn(B, kv_heads, length, dim, generator=g).to(dtype) for _ in range(2))  # [B, Hkv, L, D]
    buffers = [torch.randn(LAYERS, B, kv_heads, cache, dim, generator=g).to(dtype) for _ in range(2)]
    key_mask = torch.rand(B, cache + length, generator=g) > 0.3  # [B, C + L]
    key_mask[1, : cache + 2] = False
    return q, k, v, buffers[0][1], buffers[1][1], key_mask  # the cache read in place: layer 1's views


def tolerance(expected, dim, keys):
    # scores are length-D sums, the output a length-(C + L) weighted average of values
    return rounding_tolerance(torch.float32, max(dim, keys), float(expected.abs().max()) + 1)


@needs_triton
@pytest.mark.parametrize(("heads", "kv_heads", "length", "cache", "dim"),
                         [(4, 2, 5, 7, 12), (2, 2, 18, 0, 16), (3, 1, 3, 21, 8)])
def test_kernel_matches_reference(device, heads, kv_heads, length, cache, dim):
    # grouped and plain heads; a tile straddling cache and fresh keys; no cache; a cache longer than a tile
    args = [t.to(device) for t in inputs(heads, kv_heads, length, cache, dim)]
    expected = cached_attention_reference(*args)
    actual = cached_attention_triton(*args)
    assert not actual.isnan().any()
    torch.testing.assert_close(actual, expected, atol=tolerance(expected, dim, cache + length), rtol=0)


@needs_triton
def test_bfloat16(device):
    args = [t.to(device) for t in inputs(4, 2, 5, 9, 16, torch.bfloat16, seed=1)]
    expected = cached_attention_reference(*(t.float() if t.is_floating_point() else t for t in args))
    actual = cached_attention_triton(*args).float()
    tol = torch.finfo(torch.bfloat16).eps * float(expected.abs().max()) * 4  # inputs and output rounded once each
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


@needs_triton
def test_the_op_runs_the_kernel_where_dispatch_says(device, monkeypatch):
    args = [t.to(device) for t in inputs(4, 2, 5, 7, 12, seed=2)]
    calls = []
    monkeypatch.setattr("dlmc.kernels.cached_attention.use_triton", lambda d: calls.append(d) or True)
    actual = cached_attention(*args)
    assert calls
    expected = cached_attention_reference(*args)
    torch.testing.assert_close(actual, expected, atol=tolerance(expected, 12, 12), rtol=0)


def test_the_op_on_cpu_is_the_reference():
    args = inputs(4, 2, 5, 7, 12)
    assert torch.equal(cached_attention(*args), cached_attention_reference(*args))


def test_bad_shapes_are_one_line():
    q, k, v, ck, cv, key_mask = inputs(3, 2, 5, 7, 12)
    with pytest.raises(DlmcError, match="do not divide"):
        cached_attention(q, k, v, ck, cv, key_mask)
    q, k, v, ck, cv, key_mask = inputs(4, 2, 5, 7, 12)
    with pytest.raises(DlmcError, match="key_mask must be bool"):
        cached_attention(q, k, v, ck, cv, key_mask[:, 1:])


def test_exports_as_one_node():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v, cache_keys, cache_values, key_mask):
            return cached_attention(q, k, v, cache_keys[1], cache_values[1], key_mask)

    q, k, v, _, _, key_mask = inputs(4, 2, 5, 7, 12)
    g = torch.Generator().manual_seed(5)
    cache_keys, cache_values = (torch.randn(LAYERS, B, 2, 7, 12, generator=g) for _ in range(2))
    args = (q, k, v, cache_keys, cache_values, key_mask)
    ep = torch.export.export(Layer(), args)
    assert torch.ops.dlmc_kernels.cached_attention.default in [n.target for n in ep.graph.nodes]
    assert torch.equal(ep.module()(*args), Layer()(*args))
