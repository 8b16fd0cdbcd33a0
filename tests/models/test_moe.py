"""The MoE block's static-shape grouped experts against a per-assignment loop, on routings that fill
the tile bound exactly, and its export with a dynamic number of rows."""

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from dlmc.errors import DlmcError
from dlmc.models.moe import MoE, MoEConfig, moe_config


def block(num_experts=8, top_k=2, tile=4):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(num_experts=num_experts, top_k=top_k, expert_size=6, layers=(0,), tile=tile), 5).double()
    for p in moe.parameters():
        p.data.normal_()
    return moe


def loop(moe, x, idx):
    # x: [T, D], idx: [T, k] -> [T, k, D], one assignment at a time
    out = torch.zeros(*idx.shape, x.shape[1], dtype=x.dtype)
    for t in range(idx.shape[0]):
        for j, e in enumerate(idx[t].tolist()):
            h = F.silu(moe.experts_gate[e] @ x[t]) * (moe.experts_up[e] @ x[t])
            out[t, j] = moe.experts_down[e] @ h
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
def test_grouped_experts_equal_a_loop(idx):
    moe = block()
    idx = torch.tensor(idx)
    x = torch.randn(idx.shape[0], 5, dtype=torch.float64)
    torch.testing.assert_close(moe.experts(x, idx), loop(moe, x, idx), rtol=1e-12, atol=1e-12)


def test_exported_block_takes_any_number_of_rows():
    moe = block()
    rows = Dim("rows", min=2, max=512)
    exported = torch.export.export(moe, (torch.randn(1, 3, 5, dtype=torch.float64),), dynamic_shapes=({1: rows},))
    for n in (2, 9, 300):
        x = torch.randn(1, n, 5, dtype=torch.float64)
        assert torch.equal(exported.module()(x), moe(x))


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
