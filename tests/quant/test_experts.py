"""Stacked MoE experts quantized (dlmc.quant.experts) and the operators that run them, ops.grouped_woq and
ops.grouped_w8a8."""

import pytest
import torch
from torch.export import Dim

from dlmc.quant import ops
from dlmc.quant.calibration import LayerStats
from dlmc.quant.experts import expert_buffers, quantize_experts, run_experts
from dlmc.quant.formats import rtn
from dlmc.quant.scheme import Scheme
from tests.helpers import rounding_tolerance

SCHEMES = [Scheme(), Scheme(group_size=16, symmetric=False), Scheme(weights="int4", group_size=16),
           Scheme(weights="int4", symmetric=False)]
W8A8 = Scheme(activations="per_token")


def _stats(x):
    stats = LayerStats()
    stats.add(x, x.shape[0], torch.Generator().manual_seed(0), hessian=False)
    return stats


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_grouped_woq_equals_each_expert_quantized_on_its_own(scheme):
    torch.manual_seed(0)
    w = torch.randn(4, 32, 24)  # [E, in, out]
    x = torch.randn(10, 32)
    layer = quantize_experts("experts", w, scheme, _stats(x))
    offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # expert 1 gets no rows
    got = run_experts(x, layer, expert_buffers(layer, torch.float32), offs)  # [10, 24]
    bounds = [0, *offs.tolist()]
    for e in range(4):
        deq = rtn(w[e].T, scheme.bits, scheme.symmetric, scheme.group_size or 32).dequantize()  # [out, in]
        rows = x[bounds[e]:bounds[e + 1]]
        expected = rows @ deq.T
        tol = rounding_tolerance(torch.float32, 32, float(expected.abs().amax()) if len(rows) else 1.0)
        torch.testing.assert_close(got[bounds[e]:bounds[e + 1]], expected, atol=tol, rtol=0)
    assert layer.report["experts"] == 4 and layer.report["shape"] == [4, 32, 24]
    assert layer.report["output_sqnr_db"] > (15 if scheme.bits == 4 else 35)


def test_stacked_layouts():
    w = torch.randn(4, 32, 24)
    x = torch.randn(8, 32)
    b8 = expert_buffers(quantize_experts("e", w, Scheme(group_size=16, symmetric=False), _stats(x)), torch.float16)
    assert b8["qweight"].shape == (4, 24, 32) and b8["qweight"].dtype == torch.uint8
    assert b8["scale"].shape == b8["zero"].shape == (4, 24, 2) and b8["scale"].dtype == torch.float16
    b4 = expert_buffers(quantize_experts("e", w, Scheme(weights="int4", group_size=16), _stats(x)), torch.float32)
    assert b4["qweight"].shape == (4, 24, 2, 8) and b4["scale"].shape == (4, 48) and "zero" not in b4


class Experts(torch.nn.Module):
    def __init__(self, stored, bits):
        super().__init__()
        for name, t in stored.items():
            self.register_buffer(name, t)
        self.bits = bits

    def forward(self, x, offs):
        return ops.grouped_woq(x, self.qweight, self.scale, getattr(self, "zero", None), offs, self.bits)


def test_grouped_woq_exports_and_lowers_with_aot_inductor(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 16, 32)
    x = torch.randn(12, 16)
    layer = quantize_experts("e", w, Scheme(weights="int4", group_size=8), _stats(x))
    module = Experts(expert_buffers(layer, torch.float32), 4)
    offs = torch.tensor([2, 6, 6, 12], dtype=torch.int32)
    rows = Dim("rows", min=2, max=512)
    exported = torch.export.export(module, (x, offs), dynamic_shapes=({0: rows}, None))
    assert any(n.target is ops.grouped_woq for n in exported.graph.nodes)
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "experts.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    expected = module(x, offs)
    tol = rounding_tolerance(torch.float32, 16, float(expected.abs().max()))
    torch.testing.assert_close(runner(x, offs), expected, atol=tol, rtol=0)


def test_w8a8_codes_and_scales_are_each_experts_and_the_product_is_int8():
    """W8A8 experts: each expert's int8 codes and float32 scales are RTN of its own [out, in] weight, and
    ops.grouped_w8a8 equals per-token int8 activations times them, expert by expert."""
    torch.manual_seed(0)
    w = torch.randn(4, 32, 24)  # [E, in, out]
    x = torch.randn(10, 32)
    layer = quantize_experts("experts", w, W8A8, _stats(x))
    stored = expert_buffers(layer, torch.bfloat16)  # the scales stay float32 whatever the model's dtype
    assert stored["qweight"].dtype == torch.int8 and stored["qweight"].shape == (4, 24, 32)
    assert stored["scale"].dtype == torch.float32 and stored["scale"].shape == (4, 24)
    offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # expert 1 gets no rows
    got = run_experts(x, layer, stored, offs)  # [10, 24]
    s = x.abs().amax(-1, keepdim=True) / 127  # [10, 1]: the per-token activation scale
    xq = torch.round(x / s).clamp(-128, 127)  # [10, 32]
    bounds = [0, *offs.tolist()]
    for e in range(4):
        own = rtn(w[e].T, 8, True, 32)  # [out, in]: expert e on its own
        assert torch.equal(stored["qweight"][e], own.storage()["qweight"])
        assert torch.equal(stored["scale"][e], own.storage()["scale"].float().reshape(-1))
        rows = slice(bounds[e], bounds[e + 1])
        expected = (xq[rows].double() @ own.storage()["qweight"].double().T) * s[rows].double() * stored["scale"][e]
        tol = rounding_tolerance(torch.float32, 32, float(expected.abs().amax()) if len(expected) else 1.0)
        torch.testing.assert_close(got[rows].double(), expected, atol=tol, rtol=0)
    assert layer.report["scheme"] == "W8A8 rtn per-channel per-token"
    assert layer.report["output_sqnr_db"] > 30


def test_grouped_w8a8_exports_as_one_node_and_lowers_with_aot_inductor(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 16, 32)
    x = torch.randn(12, 16)
    module = W8A8Experts(expert_buffers(quantize_experts("e", w, W8A8, _stats(x)), torch.float32))
    offs = torch.tensor([2, 6, 6, 12], dtype=torch.int32)
    rows = Dim("rows", min=2, max=512)
    exported = torch.export.export(module, (x, offs), dynamic_shapes=({0: rows}, None))
    calls = [n for n in exported.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [ops.grouped_w8a8]
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "experts.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    # the op runs as itself inside the package (int8 products, fp32 rescale): the same numbers
    assert torch.equal(runner(x, offs), module(x, offs))


class W8A8Experts(torch.nn.Module):
    def __init__(self, stored):
        super().__init__()
        self.register_buffer("qweight", stored["qweight"])
        self.register_buffer("scale", stored["scale"])

    def forward(self, x, offs):
        return ops.grouped_w8a8(x, self.qweight, self.scale, offs)
