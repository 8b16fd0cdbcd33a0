"""fold_constants: evaluate input-independent computations once, at compile time, and drop dead code.

In a captured step this folds the RoPE inverse frequencies (arange -> pow -> reciprocal), the dtype
promotions RMSNorm asks for, and the metadata asserts on those constants. Folding runs the same eager
ATen kernels the reference runs, so the folded values are bit-identical to what eager computes; the
pass is exact.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx.node import map_aggregate

from dlmc.capture import StepProgram
from dlmc.passes import PassConfig, PassResult, copy_graph, input_kinds, rebuild, register

log = logging.getLogger(__name__)

# Asserts whose inputs are all constants are checked now, by evaluating them, and then removed.
ASSERT_OPS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}
NONDETERMINISTIC = {torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise}
STATE_KINDS = {"PARAMETER", "BUFFER", "CONSTANT_TENSOR"}


@dataclass(frozen=True, kw_only=True)
class FoldConstants(PassConfig):
    """Fold every computation that reads no step input and no weight; remove unused nodes and state."""

    name: ClassVar[str] = "fold_constants"
    exact: ClassVar[bool] = True
    max_bytes: int = 1 << 20
    """Largest tensor folding may materialise; bigger results stay computed at run time."""

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError("max_bytes: must be >= 0")


@register(FoldConstants)
def fold_constants(program: StepProgram, config: FoldConstants) -> PassResult:
    gm = copy_graph(program)
    kinds = input_kinds(program)
    constants = dict(program.exported.constants)
    state = dict(program.exported.state_dict)
    known = _evaluate_constants(gm, kinds, constants, config.max_bytes)

    asserts = [n for n in known if n.op == "call_function" and n.target in ASSERT_OPS]
    for node in asserts:
        gm.graph.erase_node(node)
        del known[node]
    frontier = _frontier(known)
    new_inputs: dict[str, InputSpec] = {}
    first_input = next(n for n in gm.graph.find_nodes(op="placeholder") if kinds[n.name][0] == "USER_INPUT")
    for node in frontier:
        value = known[node]
        if isinstance(value, torch.Tensor):
            # A folded value becomes a persistent buffer, not a lifted constant: backends keep a
            # buffer's name (AOTInductor renames large lifted constants to its own `_tensor_constantN`,
            # which the artifact's weights file could then not supply).
            key = _fresh_key(state | constants, "folded")
            state[key] = value.detach().clone()
            with gm.graph.inserting_before(first_input):
                placeholder = gm.graph.placeholder(key)
            placeholder.meta["val"] = _fake_like(node, state[key])
            new_inputs[placeholder.name] = InputSpec(
                kind=InputKind.BUFFER, arg=TensorArgument(name=placeholder.name), target=key, persistent=True
            )
            node.replace_all_uses_with(placeholder)
        else:  # a dtype, a Python number: substitute the literal into each user's arguments
            for user in list(node.users):
                user.args = map_aggregate(user.args, lambda a, n=node, v=value: v if a is n else a)
                user.kwargs = map_aggregate(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
    erased = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    state_dict, removed = _drop_unused_state(gm, kinds, state, constants)
    erased -= len(gm.graph.nodes)
    modified = bool(asserts or frontier or erased or removed)
    if not modified:
        return PassResult(program, False)
    gm.graph.lint()
    gm.recompile()
    log.debug("fold_constants: %d values folded, %d nodes removed", len(frontier), erased + len(asserts))
    return PassResult(rebuild(program, gm, state_dict=state_dict, constants=constants, new_inputs=new_inputs), True)


def _evaluate_constants(
    gm: torch.fx.GraphModule, kinds: dict[str, tuple[str, str | None]], constants: dict[str, Any], max_bytes: int
) -> dict[torch.fx.Node, Any]:
    """Node -> concrete value, for every node computable from literals and lifted constants alone."""
    known: dict[torch.fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind, target = kinds[node.name]
            if kind == "CONSTANT_TENSOR" and isinstance(constants.get(target), torch.Tensor):
                known[node] = constants[target]
            continue
        if node.op != "call_function" or not _pure(node.target):
            continue
        if not all(arg in known for arg in node.all_input_nodes):
            continue
        args = map_aggregate(node.args, lambda a: known[a] if isinstance(a, torch.fx.Node) else a)
        kwargs = map_aggregate(node.kwargs, lambda a: known[a] if isinstance(a, torch.fx.Node) else a)
        value = node.target(*args, **kwargs)
        if isinstance(value, torch.Tensor) and value.numel() * value.element_size() > max_bytes:
            continue
        known[node] = value
    return known


def _pure(target: Any) -> bool:
    if target is operator.getitem or target in ASSERT_OPS:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return not target._schema.is_mutable and not (NONDETERMINISTIC & set(target.tags))


def _frontier(known: dict[torch.fx.Node, Any]) -> list[torch.fx.Node]:
    """Computed constants that some run-time node reads: these get materialised. A value that cannot
    be materialised (a list, say) is dropped from `known`, which exposes its inputs instead."""
    while True:
        frontier = [n for n in known if n.op != "placeholder" and any(user not in known for user in n.users)]
        stuck = [n for n in frontier if not _materialisable(known[n])]
        if not stuck:
            return frontier
        for node in stuck:
            del known[node]


def _materialisable(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, torch.dtype, bool, int, float))


def _fresh_key(constants: dict[str, Any], stem: str) -> str:
    i = 0
    while f"{stem}_{i}" in constants:
        i += 1
    return f"{stem}_{i}"


def _fake_like(node: torch.fx.Node, value: torch.Tensor) -> Any:
    mode = torch._guards.detect_fake_mode([node.meta.get("val")])
    if mode is None:
        mode = torch._guards.detect_fake_mode(
            [n.meta.get("val") for n in node.graph.find_nodes(op="placeholder") if "val" in n.meta]
        )
    return mode.from_tensor(value, static_shapes=True)


def _drop_unused_state(
    gm: torch.fx.GraphModule,
    kinds: dict[str, tuple[str, str | None]],
    state_dict: dict[str, torch.Tensor],
    constants: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], int]:
    """Remove weights and constants no node reads any more (user inputs always stay)."""
    state_dict = dict(state_dict)
    removed = 0
    for node in list(gm.graph.find_nodes(op="placeholder")):
        kind, target = kinds.get(node.name, ("CONSTANT_TENSOR", node.name))
        if node.users or kind not in STATE_KINDS:
            continue
        gm.graph.erase_node(node)
        state_dict.pop(target, None)
        constants.pop(target, None)
        removed += 1
    return state_dict, removed
