"""mixed_precision: matmul weights stored and multiplied in bf16/fp16; everything else stays fp32.

The linear and embedding weights (most of the bytes) are cast once, at compile time, to the low
precision dtype. Each linear then runs on a low-precision copy of its input and returns its output
cast back to float32, so norms, RoPE, the attention softmax, residual adds and the logits stay in
float32. This is the usual autocast policy, written into the graph so every backend runs the same
numbers. It is an approximation (not exact); its oracle is the same policy applied in eager mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from dlmc.capture import StepProgram
from dlmc.passes import PassConfig, PassResult, copy_graph, fake_value, input_kinds, rebuild, register

log = logging.getLogger(__name__)

LINEAR = torch.ops.aten.linear.default
EMBEDDING = torch.ops.aten.embedding.default
CAST = torch.ops.aten._to_copy.default
WIDE = (torch.float32, torch.float64)


@dataclass(frozen=True, kw_only=True)
class MixedPrecision(PassConfig):
    """Store linear and embedding weights in `dtype` and run the matmuls in it; keep the rest in fp32."""

    name: ClassVar[str] = "mixed_precision"
    exact: ClassVar[bool] = False
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    keep: tuple[str, ...] = ()
    """Weight-name prefixes left in full precision, e.g. ["lm_head"]."""


@register(MixedPrecision)
def mixed_precision(program: StepProgram, config: MixedPrecision) -> PassResult:
    low = getattr(torch, config.dtype)
    gm = copy_graph(program)
    kinds = input_kinds(program)
    state_dict = dict(program.exported.state_dict)
    weights = _convertible_weights(gm, kinds, state_dict, config.keep)
    if not weights:
        return PassResult(program, False)

    for placeholder in weights:
        _retype(placeholder, low)
    cast_inputs: dict[torch.fx.Node, torch.fx.Node] = {}  # one low-precision copy per activation
    converted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not (set(node.all_input_nodes) & weights):
            continue
        wide = node.meta["val"].dtype
        if node.target is LINEAR:
            x = node.args[0]
            if x not in cast_inputs:
                cast_inputs[x] = _insert_cast(gm, x, low, at=node, before=True)
            node.args = (cast_inputs[x], *node.args[1:])
        node.meta["val"] = fake_value(node.target, node.args, node.kwargs)
        back = _insert_cast(gm, node, wide, at=node, before=False)
        node.replace_all_uses_with(back, delete_user_cb=lambda user, b=back: user is not b)
        converted += 1

    for placeholder in weights:
        key = kinds[placeholder.name][1]
        state_dict[key] = torch.nn.Parameter(state_dict[key].detach().to(low), requires_grad=False)
    gm.graph.lint()
    gm.recompile()
    log.debug("mixed_precision: %d matmuls and %d weights moved to %s", converted, len(weights), config.dtype)
    return PassResult(rebuild(program, gm, state_dict=state_dict), True)


def _convertible_weights(
    gm: torch.fx.GraphModule,
    kinds: dict[str, tuple[str, str | None]],
    state_dict: dict[str, torch.Tensor],
    keep: tuple[str, ...],
) -> set[torch.fx.Node]:
    """Full-precision parameters read only as a linear's weight/bias or an embedding's table. A weight
    with any other reader (a norm scale, say) stays as it is."""
    found = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        kind, key = kinds[node.name]
        if kind != "PARAMETER" or (keep and key.startswith(keep)):
            continue
        if state_dict[key].dtype in WIDE and node.users and all(_reads_as_weight(u, node) for u in node.users):
            found.add(node)
    # A linear converts only as a whole: drop a weight whose linear also reads an unconvertible one.
    while True:
        partial = {
            w for w in found for user in w.users if user.target is LINEAR and not set(user.args[1:]) - {None} <= found
        }
        if not partial:
            return found
        found -= partial


def _reads_as_weight(user: torch.fx.Node, weight: torch.fx.Node) -> bool:
    if user.target is LINEAR:
        return weight in user.args[1:] and user.args[0] is not weight
    if user.target is EMBEDDING:
        return user.args[0] is weight
    return False


def _retype(placeholder: torch.fx.Node, dtype: torch.dtype) -> None:
    val = placeholder.meta["val"]
    with torch._guards.detect_fake_mode([val]):
        placeholder.meta["val"] = val.to(dtype)


def _insert_cast(
    gm: torch.fx.GraphModule, value: torch.fx.Node, dtype: torch.dtype, *, at: torch.fx.Node, before: bool
) -> torch.fx.Node:
    with gm.graph.inserting_before(at) if before else gm.graph.inserting_after(at):
        cast = gm.graph.call_function(CAST, (value,), {"dtype": dtype})
    cast.meta["val"] = fake_value(CAST, (value,), {"dtype": dtype})
    # The cast belongs to the module of the matmul it serves, for passes that look for blocks later.
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if key in at.meta:
            cast.meta[key] = at.meta[key]
    return cast
