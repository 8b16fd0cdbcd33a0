"""materialize_tables: RoPE's cos and sin and the attention mask go through one dlmc::materialize each (an opaque copy, so Inductor
computes them once), and the step computes exactly what it did."""

import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.kernels.materialize import materialize
from dlmc.lower.materialize import materialize_tables
from dlmc.models import load_model
from dlmc.pipeline import check_program
from tests.helpers import padded_batch


def test_every_layer_reads_one_copy_of_the_tables_and_the_logits_are_the_same(checkpoints):
    step = capture(load_model(checkpoints["llada"]), CaptureConfig(max_batch=2))
    tables = [n for n in step.exported.graph.nodes if n.target in (torch.ops.aten.cos.default, torch.ops.aten.sin.default)]
    assert len(tables) == 2 and all(len(n.users) > 1 for n in tables)  # read by every layer's q and k
    done = materialize_tables(step)
    check_program(done)
    copies = [n for n in done.exported.graph.nodes if n.target is materialize]
    trig = (torch.ops.aten.cos.default, torch.ops.aten.sin.default)
    assert sorted(n.args[0].target in trig for n in copies) == [False, True, True]  # cos, sin, and the mask
    (mask,) = [n for n in copies if n.args[0].target not in trig]
    sdpa = [n for n in done.exported.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) > 1 and all(n.args[3] is mask for n in sdpa)  # every layer reads the one mask
    assert all(len(n.args[0].users) == 1 for n in copies)  # the readers moved to the copy
    assert step.exported.graph is not done.exported.graph  # the input program is left as it was
    inputs = padded_batch([7, 5], 9)
    (before,), (after,) = (torch.utils._pytree.tree_leaves(p.exported.module()(*inputs)) for p in (step, done))
    assert torch.equal(before, after)  # [B, L, V]: the same kernels on the same values


def test_a_step_without_shared_tables_is_returned_as_is(checkpoints):
    step = capture(load_model(checkpoints["llada"]), CaptureConfig(max_batch=2))
    once = materialize_tables(step)
    assert materialize_tables(once) is once  # the tables' only reader is now the copy
