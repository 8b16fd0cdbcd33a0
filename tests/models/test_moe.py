"""The MoE block's two forms of the experts (grouped matmul, tiles) against a per-assignment loop, on
routings that fill the tile bound exactly, and their export with a dynamic number of rows (AOTInductor
for the grouped form, whose operator is ours)."""

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from dlmc.errors import DlmcError
from dlmc.models.moe import EXPERTS_FORMS, MoE, MoEConfig, moe_config, set_experts_form
from tests.helpers import rounding_tolerance


def block(num_experts=8, top_k=2, tile=4, form="grouped", hidden=5, width=6, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_size=width, layers=(0,), tile=tile)
    moe = MoE(cfg, hidden).to(dtype)
    for p in moe.parameters():
        p.data.normal_()
    set_experts_form(moe, form)
    return moe


def loop(moe, x, idx):
    # x: [T, D], idx: [T, k] -> [T, k, D], one assignment at a time
    out = torch.zeros(*idx.shape, x.shape[1], dtype=x.dtype)
    for t in range(idx.shape[0]):
        for j, e in enumerate(idx[t].tolist()):
            h = F.silu(x[t] @ moe.experts_gate[e]) * (x[t] @ moe.experts_up[e])  # weights [in, out]
            out[t, j] = h @ moe.experts_down[e]
    return out


@pytest.mark.parametrize(
    "idx",
    [
        [[0, 1], [2, 3], [4, 5]],  # fewer assignments than experts, all distinct: one tile each
        # 5 assignments per expert, 2 tiles of 4 each: (40 + 8 * 3) // 4 = 16 tiles, the bound, all used
        [[e, (e + 1) % 8] for e in range(8)] + [[e, (e + 3) % 8] for e in range(8)] + [[e, e + 4] for e in range(4)],
        [[3, 3]] * 9 + [[1, 3]],  # one expert takes nearly everything
    ],
    ids=["distinct", "tile-bound-filled", "skewed"],
)
@pytest.mark.parametrize("form", EXPERTS_FORMS)
def test_experts_equal_a_loop(idx, form):
    moe = block(form=form)  # float64: the grouped operator's per-expert torch.mm kernel
    idx = torch.tensor(idx)
    x = torch.randn(idx.shape[0], 5, dtype=torch.float64)
    torch.testing.assert_close(moe.experts(x, idx), loop(moe, x, idx), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_equals_a_loop(dtype):
    # aten's grouped kernel (float32 / bf16, 16-byte rows); per-expert sums of 16 / 32 products
    moe = block(hidden=16, width=32, dtype=dtype)
    idx = torch.tensor([[3, 3]] * 9 + [[1, 3], [0, 7], [7, 6]])
    x = torch.randn(idx.shape[0], 16, dtype=dtype)
    with torch.no_grad():
        got = moe.experts(x, idx).double()
        expected = loop(moe.double(), x.double(), idx)  # the same rounded weights, in float64
    tol = rounding_tolerance(dtype, 32, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)


def test_unknown_form_is_one_line():
    with pytest.raises(DlmcError, match="^capture.moe_experts: 'ragged' is not one of grouped, tiled$"):
        set_experts_form(block(), "ragged")


@pytest.mark.parametrize("form", EXPERTS_FORMS)
def test_exported_block_takes_any_number_of_rows(form):
    moe = block(form=form)
    rows = Dim("rows", min=2, max=512)
    exported = torch.export.export(moe, (torch.randn(1, 3, 5, dtype=torch.float64),), dynamic_shapes=({1: rows},))
    for n in (2, 9, 300):
        x = torch.randn(1, n, 5, dtype=torch.float64)
        assert torch.equal(exported.module()(x), moe(x))


def test_grouped_block_lowers_with_aot_inductor(tmp_path):
    # float32 with 16-byte rows: aten's grouped kernel inside the package; sums over 16 / 32 products
    moe = block(hidden=16, width=32, dtype=torch.float32).eval().requires_grad_(False)
    rows = Dim("rows", min=2, max=512)
    exported = torch.export.export(moe, (torch.randn(1, 3, 16),), dynamic_shapes=({1: rows},))
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "moe.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    for n in (2, 9, 300):
        x = torch.randn(1, n, 16)
        expected = moe(x)
        tol = rounding_tolerance(torch.float32, 32, float(expected.abs().max()))
        torch.testing.assert_close(runner(x), expected, atol=tol, rtol=0)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (dict(num_experts=4, top_k=5), "'num_experts_per_tok' (5) exceeds 'num_experts' (4)"),
        (dict(num_experts=8, top_k=2, num_groups=3, topk_groups=1), "'n_group' (3) does not divide 'num_experts' (8)"),
        (dict(num_experts=8, top_k=2, num_groups=4, topk_groups=5), "'topk_group' (5)"),
        (dict(num_experts=8, top_k=2, num_groups=8, topk_groups=1), "fewer than 2 experts per group"),
        (dict(num_experts=8, top_k=5, num_groups=4, topk_groups=2), "exceeds the 4 experts"),
    ],
)
def test_impossible_routing_is_one_line(fields, fragment):
    with pytest.raises(DlmcError, match="^config.json: ") as info:
        moe_config("config.json", expert_size=4, layers=(0,), **fields)
    assert fragment in str(info.value)
