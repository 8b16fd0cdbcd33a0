"""RoPE's cos and sin, computed once per step on the CPU instead of once per layer and head.

Inductor's CPU code generator inlines a pointwise value into every kernel that reads it unless the value
is "heavy" (exp, log, tanh, ...: `should_realize_on_reuse` in torch/_inductor/ir.py); cos and sin are not
on that list, so each layer's rotation of q and k recomputes them for every head. On the 134M model at
512 rows that is ~1.5M sin/cos per layer, ~7 ms of a ~120 ms step at 2 threads (dynamic shapes). Before
AOTInductor compiles a CPU step, every cos and sin with more than one reader is passed through
`dlmc::materialize`, an opaque copy Inductor cannot inline: the tables are computed once and every layer
reads them. The values are the same; only where they are computed changes.
"""

from __future__ import annotations

import torch

from dlmc.capture import StepProgram
from dlmc.kernels.materialize import materialize
from dlmc.passes import copy_graph, rebuild

_TABLES = (torch.ops.aten.cos.default, torch.ops.aten.sin.default)


def materialize_tables(program: StepProgram) -> StepProgram:
    """The program with every multiply-read cos and sin materialized (the input program is not edited)."""
    gm = copy_graph(program)
    graph = gm.graph
    shared = [n for n in graph.nodes if n.op == "call_function" and n.target in _TABLES and len(n.users) > 1]
    if not shared:
        return program
    for node in shared:
        with graph.inserting_after(node):
            copy = graph.call_function(materialize, (node,))
        copy.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")}
        node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    graph.lint()
    gm.recompile()
    return rebuild(program, gm)
