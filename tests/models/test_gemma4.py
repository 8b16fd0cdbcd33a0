"""Gemma-4's experts in the two captured forms (grouped_mm over the published [out, in] matrices read in
place, tiles of standard ops) against the per-expert reference loop, and their export."""

import pytest
import torch
from torch.export import Dim

from dlmc.models.gemma4 import Gemma4Config, Gemma4Experts
from dlmc.models.moe import EXPERTS_FORMS, set_experts_form
from tests.helpers import rounding_tolerance


def experts(dtype, hidden=16, width=8, num_experts=8):
    cfg = Gemma4Config(
        hidden_size=hidden, vocab_size=32, layer_types=("sliding_attention",), num_heads=2, head_dims=(8,),
        kv_heads=(1,), intermediate_size=16, num_experts=num_experts, top_k=2, expert_size=width,
        rms_norm_eps=1e-6, sliding_window=4, rope_theta={"sliding_attention": 1e4},
        rope_fraction={"sliding_attention": 1.0},
    )
    torch.manual_seed(0)
    module = Gemma4Experts(cfg).to(dtype)
    for p in module.parameters():
        p.data.normal_()
    return module


ROUTINGS = {
    "distinct": [[0, 1], [2, 3], [4, 5]],
    "skewed": [[3, 5]] * 9 + [[1, 3], [0, 7], [7, 6]],  # one expert takes nearly everything, some none
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("form", EXPERTS_FORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_experts_equal_the_loop(routing, form, dtype):
    # float32 / bf16 with 16-byte rows take aten's grouped kernel on the transposed views; float64 the mm loop
    module = experts(dtype)
    set_experts_form(module, form)
    idx = torch.tensor(ROUTINGS[routing])
    weights = torch.rand(idx.shape, dtype=torch.float32)
    x = torch.randn(idx.shape[0], 16, dtype=dtype)
    with torch.no_grad():
        got, want = module(x, weights, idx).double(), module.loop(x, weights, idx).double()
    torch.testing.assert_close(got, want, atol=rounding_tolerance(dtype, 16 * 8, float(want.abs().max())), rtol=0)


@pytest.mark.parametrize("form", EXPERTS_FORMS)
def test_experts_export_with_any_number_of_rows(form):
    module = experts(torch.float32)
    set_experts_form(module, form)

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = module

        def forward(self, x, weights, idx):
            return self.experts(x, weights, idx)

    rows = Dim("rows", min=2, max=64)
    idx = torch.tensor([[0, 1], [2, 3], [3, 1]])
    example = (torch.randn(3, 16), torch.rand(3, 2), idx)
    with torch.no_grad():
        program = torch.export.export(Routed(), example, dynamic_shapes=({0: rows}, {0: rows}, {0: rows}))
    idx = torch.tensor(ROUTINGS["skewed"])
    x, weights = torch.randn(idx.shape[0], 16), torch.rand(idx.shape)
    with torch.no_grad():
        got, want = program.module()(x, weights, idx), module.loop(x, weights, idx)
    torch.testing.assert_close(got, want, atol=rounding_tolerance(torch.float32, 128, float(want.abs().max())), rtol=0)
