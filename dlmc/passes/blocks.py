"""Finding the transformer blocks of a captured step: the nodes of `layers.N` and the residual stream
through them, by module path and data flow alone (no family-specific names)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from dlmc.errors import DlmcError

LAYER = re.compile(r"layers\.(\d+)")


@dataclass(frozen=True)
class Block:
    index: int
    nodes: list[torch.fx.Node]
    """The nodes captured inside `layers.{index}` that read the residual stream, in graph order."""
    shared: list[torch.fx.Node]
    """Its other nodes: they compute from values outside the block only. An alias made inside the
    first block (RoPE's cos.to(dtype) when that dtype is already cos's) is read by every later
    block, so these stay when the block goes."""
    input: torch.fx.Node
    """The residual stream entering the block."""
    output: torch.fx.Node
    """The residual stream leaving it: the block's only residual-dependent value read outside it."""


def layer_of(node: torch.fx.Node) -> int | None:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        match = LAYER.fullmatch(path)
        if match:
            return int(match.group(1))
    return None


def find_blocks(gm: torch.fx.GraphModule) -> dict[int, Block]:
    """Layer index -> Block, for every transformer block still in the graph."""
    members: dict[int, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        index = layer_of(node) if node.op == "call_function" else None
        if index is not None:
            members.setdefault(index, []).append(node)
    return {index: _block(index, nodes) for index, nodes in members.items()}


def _block(index: int, nodes: list[torch.fx.Node]) -> Block:
    inside = set(nodes)
    reads = {arg for n in nodes for arg in n.all_input_nodes if arg not in inside}
    dependent_on: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for candidate in reads:
        dependent_on[candidate] = _dependents(nodes, candidate)
    # The residual stream is the outside value the block's value read from outside derives from:
    # a [batch, seq, hidden] tensor of the block output's dtype.
    candidates = []
    for candidate, dependent in dependent_on.items():
        outputs = [n for n in dependent if any(user not in inside for user in n.users)]
        if len(outputs) == 1 and _shape_and_dtype(outputs[0]) == _shape_and_dtype(candidate) is not None:
            candidates.append((candidate, dependent, outputs[0]))
    if len(candidates) != 1:
        raise DlmcError(f"layer_skip: cannot tell the residual stream through layers.{index} "
                        f"({len(candidates)} candidates)")
    ((input_, dependent, output),) = candidates
    depends = set(dependent)
    shared = [n for n in nodes if n not in depends]
    return Block(index=index, nodes=dependent, shared=shared, input=input_, output=output)


def _dependents(nodes: list[torch.fx.Node], source: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes (in graph order) that read `source`, directly or through each other."""
    found: set[torch.fx.Node] = set()
    for node in nodes:
        if any(arg is source or arg in found for arg in node.all_input_nodes):
            found.add(node)
    return [n for n in nodes if n in found]


def outside_layers(stack: dict[str, Any]) -> dict[str, Any]:
    """The module stack cut above its `layers.N` entry."""
    kept = {}
    for key, (path, kind) in stack.items():
        if LAYER.fullmatch(path):
            break
        kept[key] = (path, kind)
    return kept


def _shape_and_dtype(node: torch.fx.Node) -> tuple[str, Any] | None:
    val = node.meta.get("val")
    # Symbolic sizes compare by name: == on them would add guards to the graph's shape environment.
    return (str(tuple(val.shape)), val.dtype) if isinstance(val, torch.Tensor) else None
