"""RoPE's cos and sin and the attention mask, computed once per step on the CPU instead of once per layer.

Inductor's CPU code generator inlines a pointwise value into every kernel that reads it unless the value
is "heavy" (exp, log, tanh, ...: `should_realize_on_reuse` in torch/_inductor/ir.py); cos and sin are not
on that list, so each layer's rotation of q and k recomputes them for every head. On the 134M model at
512 rows that is ~1.5M sin/cos per layer, ~7 ms of a ~120 ms step at 2 threads (dynamic shapes). Before
AOTInductor compiles a CPU step, every cos and sin with more than one reader is passed through
`dlmc::materialize`, an opaque copy Inductor cannot inline: the tables are computed once and every layer
reads them. The attention mask (key padding or'd with the diagonal) is the same case: every layer's
attention, an extern kernel, reads it, and Inductor wrote one copy per layer. The values are the same;
only where they are computed changes.
"""

from __future__ import annotations

import torch

from dlmc.capture import StepProgram
from dlmc.kernels.cpu_attention import attention as cpu_attention
from dlmc.kernels.materialize import materialize
from dlmc.passes import copy_graph, rebuild

_TABLES = (torch.ops.aten.cos.default, torch.ops.aten.sin.default)
_ATTENTION = (torch.ops.aten.scaled_dot_product_attention.default, cpu_attention)


def materialize_tables(program: StepProgram) -> StepProgram:
    """The program with every multiply-read cos and sin, and every attention mask more than one layer reads,
    materialized (the input program is not edited)."""
    gm = copy_graph(program)
    graph = gm.graph
    shared = [n for n in graph.nodes if n.op == "call_function" and _shared(n)]
    if not shared:
        return program
    for node in shared:
        with graph.inserting_after(node):
            copy = graph.call_function(materialize, (node,))
        copy.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace")}  # the same value
        node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    graph.lint()
    gm.recompile()
    return rebuild(program, gm)


def _shared(node: torch.fx.Node) -> bool:
    if node.target is materialize:  # done already
        return False
    if node.target in _TABLES:
        return len(node.users) > 1
    # an attention kernel is an extern call: Inductor writes its mask argument to a buffer, one per layer
    # when the mask is a pointwise expression it would otherwise inline (the key padding | the diagonal)
    return sum(_mask_of(user) is node for user in node.users) > 1


def _mask_of(node: torch.fx.Node) -> torch.fx.Node | None:
    if node.target not in _ATTENTION:
        return None
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
