import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.kernels import dispatch
from dlmc.kernels.woq_gemm import GEMV_ROWS, linear_woq, linear_woq_triton
from dlmc.quant import ops
from dlmc.quant.formats import rtn
from tests.helpers import rounding_tolerance
from tests.kernels.conftest import needs_triton

OUT, IN, GROUP = 48, 64, 16


def stored(bits, symmetric, dtype=torch.float32, seed=0):
    """The layer's tensors in linear_woq's layouts (as dlmc.quant.layer stores them)."""
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed))
    st = rtn(w, bits, symmetric, GROUP).storage()
    qweight, scale, zero = st["qweight"], st["scale"].to(dtype), st.get("zero")
    if bits == 4:  # [out, G, gs // 2] blocks, scales and zeros flat [out * G]
        qweight = qweight.reshape(OUT, IN // GROUP, -1)
        scale, zero = scale.reshape(-1), (None if zero is None else zero.reshape(-1))
    return qweight, scale, zero


def activations(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, IN, generator=g).to(dtype), torch.randn(OUT, generator=g).to(dtype)


@needs_triton
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 21])  # GEMV (<= GEMV_ROWS), GEMV with a padded tile, GEMM
def test_kernel_matches_linear_woq(device, bits, symmetric, rows):
    qweight, scale, zero = (None if t is None else t.to(device) for t in stored(bits, symmetric))
    x, bias = (t.to(device) for t in activations((rows,)))
    expected = ops.linear_woq(x.cpu(), *(None if t is None else t.cpu() for t in (qweight, scale, zero, bias)), bits)
    actual = linear_woq_triton(x, qweight, scale, zero, bias, bits).cpu()
    tol = rounding_tolerance(torch.float32, IN, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


def test_gemv_threshold_splits_the_parametrized_rows():
    assert 1 <= GEMV_ROWS and 3 <= GEMV_ROWS < 21


@needs_triton
@pytest.mark.parametrize("rows", [2, 17])
def test_bfloat16_activations_and_scales(device, rows):
    qweight, scale, zero = (None if t is None else t.to(device) for t in stored(4, True, torch.bfloat16, seed=2))
    x, bias = (t.to(device) for t in activations((rows,), torch.bfloat16, seed=3))
    expected = ops.linear_woq(x.cpu(), qweight.cpu(), scale.cpu(), None, bias.cpu(), 4)
    actual = linear_woq_triton(x, qweight, scale, zero, bias, 4).cpu()
    # both round float32 sums to bfloat16 once: they may differ by one bfloat16 unit, plus the sums' rounding
    scale_out = float(expected.float().abs().max())
    tol = torch.finfo(torch.bfloat16).eps * scale_out + rounding_tolerance(torch.float32, IN, scale_out)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=0)


@needs_triton
def test_the_op_runs_the_kernel_where_dispatch_says(device, monkeypatch):
    qweight, scale, zero = (None if t is None else t.to(device) for t in stored(8, True))
    x, _ = (t.to(device) for t in activations((2, 5)))  # leading dims are kept
    calls = []
    monkeypatch.setattr("dlmc.kernels.woq_gemm.use_triton", lambda d: calls.append(d) or True)
    actual = linear_woq(x, qweight, scale, zero, None, 8)
    assert calls and actual.shape == (2, 5, OUT)
    expected = ops.linear_woq(x.cpu(), qweight.cpu(), scale.cpu(), None, None, 8)
    tol = rounding_tolerance(torch.float32, IN, float(expected.abs().max()))
    torch.testing.assert_close(actual.cpu(), expected, atol=tol, rtol=0)


def test_the_op_on_cpu_is_the_reference():
    assert dispatch.use_triton("cpu") is False
    qweight, scale, zero = stored(4, False)
    x, bias = activations((4,))
    assert torch.equal(linear_woq(x, qweight, scale, zero, bias, 4), ops.linear_woq(x, qweight, scale, zero, bias, 4))


def test_bad_layouts_are_one_line():
    qweight, scale, zero = stored(4, True)
    x, _ = activations((2,))
    with pytest.raises(DlmcError, match="linear_woq.bits"):
        linear_woq(x, qweight, scale, zero, None, 3)
    with pytest.raises(DlmcError, match="bits 8 needs"):
        linear_woq(x, qweight, scale, zero, None, 8)
    with pytest.raises(DlmcError, match="bits 4 needs"):
        linear_woq(x[:, :32], qweight, scale, zero, None, 4)


def test_exports_as_one_node():
    qweight, scale, zero = stored(4, False)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in (("qweight", qweight), ("scale", scale), ("zero", zero)):
                self.register_buffer(name, t)

        def forward(self, x):
            return linear_woq(x, self.qweight, self.scale, self.zero, None, 4)

    x, _ = activations((2, 6))
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(Layer(), (x,), dynamic_shapes=({1: seq},))
    assert torch.ops.dlmc_kernels.linear_woq.default in [n.target for n in ep.graph.nodes]
    assert torch.equal(ep.module()(x[:, :3]), ops.linear_woq(x[:, :3], qweight, scale, zero, None, 4))
