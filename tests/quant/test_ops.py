import pytest
import torch
import torch.nn.functional as F

from dlmc.quant import ops
from dlmc.quant.formats import rtn


@pytest.mark.parametrize(
    ("bits", "symmetric", "group_size"), [(8, True, 64), (8, False, 16), (4, True, 16), (4, False, 32)]
)
def test_linear_woq_is_linear_with_the_dequantized_weight(bits, symmetric, group_size):
    from dlmc.quant.layer import QuantizedLayer, buffers
    from dlmc.quant.scheme import Scheme

    w, x, bias = torch.randn(24, 64), torch.randn(2, 5, 64), torch.randn(24)
    qw = rtn(w, bits, symmetric, group_size)
    b = buffers(QuantizedLayer(scheme=Scheme(weights=f"int{bits}"), weight=qw), torch.float32)
    if bits == 4:
        assert b["qweight"].shape == (24, 64 // group_size, group_size // 2)  # MatMulNBits blocks
    y = ops.linear_woq(x, b["qweight"], b["scale"], b.get("zero"), bias, bits)
    torch.testing.assert_close(y, F.linear(x, qw.dequantize(), bias), rtol=1e-5, atol=1e-5)


def test_linear_w8a8_equals_integer_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 32, generator=g)
    qw = rtn(torch.randn(16, 32, generator=g), 8, True, 32)
    q8 = qw.codes.to(torch.int8)
    # per token, dynamic
    s = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / s).clamp(-128, 127).long()
    expected = (xq @ q8.long().T).double() * s.double() * qw.scale.double().reshape(-1)
    torch.testing.assert_close(ops.linear_w8a8(x, q8, qw.scale, None, None).double(), expected, rtol=1e-5, atol=1e-5)
    # per tensor, static: values beyond the calibrated range saturate
    a = torch.tensor(0.01)
    xq = torch.round(x / a).clamp(-128, 127).long()
    expected = (xq @ q8.long().T).double() * 0.01 * qw.scale.double().reshape(-1)
    torch.testing.assert_close(ops.linear_w8a8(x, q8, qw.scale, None, a).double(), expected, rtol=1e-5, atol=1e-5)


def test_linear_w8a8_in_fp16_rescales_sums_beyond_the_fp16_range():
    """int8 x int8 sums over 64 channels reach 127 * 127 * 64 > 65504, the largest fp16."""
    x = torch.full((2, 64), 1.0)
    q8 = torch.full((3, 64), 127, dtype=torch.int8)
    scale = torch.full((3, 1), 1 / 127)
    expected = ops.linear_w8a8(x, q8, scale, None, torch.tensor(1 / 127))  # fp32: 64 * 1 * 1
    actual = ops.linear_w8a8(x.half(), q8, scale.half(), None, torch.tensor(1 / 127).half())
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.float(), expected, rtol=2e-3, atol=0)
    dynamic = ops.linear_w8a8(x.half(), q8, scale.half(), None, None)  # per token: the same sums
    torch.testing.assert_close(dynamic.float(), expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("rows, inner, out", [(1, 12, 10), (3, 32, 16), (40, 64, 24)])
def test_padded_int_mm_meets_cudas_shape_rules_and_gives_the_same_sums(rows, inner, out, monkeypatch):
    """CUDA's int8 GEMM needs > 16 rows and inner / output sizes in multiples of 8 (a cached step has few
    rows); the padded path is run here on the CPU, where integer sums are exact."""
    g = torch.Generator().manual_seed(rows)
    a = torch.randint(-128, 128, (rows, inner), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (out, inner), generator=g, dtype=torch.int8)
    shapes = []
    real_int_mm = torch._int_mm

    def recording_int_mm(x, y):
        shapes.append((tuple(x.shape), tuple(y.shape)))
        return real_int_mm(x, y)

    monkeypatch.setattr(torch, "_int_mm", recording_int_mm)
    padded = ops.padded_int_mm(a, w)
    (m, k), (k2, n) = shapes[0]
    assert m > 16 and k % 8 == 0 and k == k2 and n % 8 == 0
    assert padded.dtype == torch.int32 and torch.equal(padded, (a.long() @ w.long().T).int())
