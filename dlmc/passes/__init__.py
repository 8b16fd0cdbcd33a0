"""Graph passes over a captured step.

A pass is a frozen, keyword-only config dataclass (the recipe entry) plus one function
`(StepProgram, config) -> PassResult` registered for that config type. The registry maps types to
functions and names to types; it never decides order: the recipe's list order is the execution order.

PassResult mirrors torch.fx's `PassResult(graph_module, modified)`, but carries the whole StepProgram,
because a pass may change what an fx GraphModule alone cannot hold: the weights, the lifted
constants, and the step signature the runtime drives.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputSpec, OutputSpec, TensorArgument
from torch.fx.node import map_aggregate

from dlmc.artifact import StepSignature, TensorSpec
from dlmc.capture import StepProgram
from dlmc.errors import DlmcError


class PassConfig:
    """Base of pass configs. Subclasses are @dataclass(frozen=True, kw_only=True)."""

    name: ClassVar[str]
    """The recipe key, e.g. "fold_constants"."""
    exact: ClassVar[bool]
    """True when the rewritten step computes exactly what the original does (so compiled output must
    equal the reference decoder's); False for approximations such as lower-precision weights."""
    version: ClassVar[int] = 1
    """Bump when the pass's semantics change; recorded in the artifact manifest."""
    kv_cache: ClassVar[bool] = False
    """True for the caching passes, which give the step K/V cache inputs (a recipe holds at most one)
    and provide `policy() -> dlmc.runtime.policies.CachePolicy`, the rules the runtime drives it by."""


class PassResult(NamedTuple):
    program: StepProgram
    modified: bool


Pass = Callable[[StepProgram, Any], PassResult]
PASSES: dict[type[PassConfig], Pass] = {}


def register(config_type: type[PassConfig]) -> Callable[[Pass], Pass]:
    def deco(fn: Pass) -> Pass:
        if config_type in PASSES:
            raise RuntimeError(f"pass config {config_type.__name__} registered twice")
        PASSES[config_type] = fn
        return fn

    return deco


def pass_configs() -> dict[str, type[PassConfig]]:
    """Recipe name -> config type, derived from the one registration site."""
    return {config_type.name: config_type for config_type in PASSES}


# ---------------------------------------------------------------------------------------------
# helpers the pass modules share: editing an ExportedProgram without breaking its invariants
# ---------------------------------------------------------------------------------------------


def copy_graph(program: StepProgram) -> torch.fx.GraphModule:
    """A private copy of the program's graph module for a pass to edit (passes never edit their input)."""
    return _deepcopy(program.graph_module)


def _deepcopy(obj: Any) -> Any:
    with warnings.catch_warnings():
        # Copying pytree specs (in node metadata, in the module call graph) trips a torch-internal
        # deprecation warning that says nothing about our code.
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj)


def rebuild(
    program: StepProgram,
    gm: torch.fx.GraphModule,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    constants: dict[str, Any] | None = None,
    new_inputs: dict[str, InputSpec] | None = None,
) -> StepProgram:
    """A new StepProgram around an edited graph. The graph signature is re-derived from the graph:
    input specs follow the placeholders (a pass that adds a placeholder passes its spec in
    `new_inputs`, keyed by node name; a removed placeholder drops its spec), and output specs follow
    the output node by position."""
    ep = program.exported
    specs_by_name = {spec.arg.name: spec for spec in ep.graph_signature.input_specs} | (new_inputs or {})
    input_specs = [specs_by_name[node.name] for node in gm.graph.find_nodes(op="placeholder")]
    returned = gm.graph.output_node().args[0]
    output_specs = [
        OutputSpec(kind=old.kind, arg=_rename(old.arg, node), target=old.target)
        for old, node in zip(ep.graph_signature.output_specs, returned, strict=True)
    ]
    module_call_graph = _deepcopy(ep.module_call_graph)
    root = module_call_graph[0].signature
    if root is not None and root.outputs:  # names are recorded only when the module call graph is kept
        user_outputs = [
            node for spec, node in zip(output_specs, returned, strict=True) if spec.kind.name == "USER_OUTPUT"
        ]
        root.outputs = [_rename(arg, node) for arg, node in zip(root.outputs, user_outputs, strict=True)]
    exported = ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(input_specs=input_specs, output_specs=output_specs),
        state_dict=ep.state_dict if state_dict is None else state_dict,
        range_constraints=_deepcopy(ep.range_constraints),
        module_call_graph=module_call_graph,
        example_inputs=ep.example_inputs,  # AOTInductor compiles against them
        constants=ep.constants if constants is None else constants,
        verifiers=ep.verifiers,
    )
    return program.with_exported(exported)


def _rename(arg: Any, node: torch.fx.Node) -> Any:
    return TensorArgument(name=node.name) if isinstance(arg, TensorArgument) else arg


def fake_value(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    """The meta["val"] (a FakeTensor) of a node calling `target` on `args`, computed under the graph's
    own fake mode, so that new nodes carry the metadata the verifier and the backends expect."""
    kwargs = kwargs or {}
    vals = [a.meta["val"] for a in _nodes_in((args, kwargs))]
    mode = torch._guards.detect_fake_mode(vals)

    def val(a: Any) -> Any:
        return a.meta["val"] if isinstance(a, torch.fx.Node) else a

    with mode:
        return target(*map_aggregate(args, val), **map_aggregate(kwargs, val))


def _nodes_in(obj: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    map_aggregate(obj, lambda a: found.append(a) if isinstance(a, torch.fx.Node) else a)
    return found


def input_kinds(program: StepProgram) -> dict[str, tuple[str, str | None]]:
    """Placeholder name -> (input kind name, state/constant key), e.g. ("PARAMETER", "lm_head.weight")."""
    return {spec.arg.name: (spec.kind.name, spec.target) for spec in program.exported.graph_signature.input_specs}


EXAMPLE_SIZES = {"batch": 2, "seq": 8, "cache": 5, "rows": 3}
"""Distinct example sizes for re-export, so no two dims are taken to be equal."""


def reexport(module: torch.fx.GraphModule, program: StepProgram, signature: StepSignature, pass_name: str) -> ExportedProgram:
    """Export a pass's edited (unlifted) module again, every named dim of its new signature dynamic:
    how a pass that adds step inputs (a K/V cache, head rows) gives them symbolic shapes and metadata."""
    device = next(iter(program.exported.state_dict.values())).device
    max_batch, max_seq = signature.batch[1], signature.seq[1]
    dims = {
        "batch": Dim("batch", min=1, max=max_batch) if max_batch > 1 else None,
        "seq": Dim("seq", min=signature.seq[0], max=max_seq),
        "cache": Dim("cache", min=1, max=max_seq),
        "rows": Dim("rows", min=1, max=max_seq),
    }
    sizes = dict(EXAMPLE_SIZES, batch=min(2, max_batch))
    examples, shapes = [], {}
    for spec in signature.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        examples.append(_example_input(spec, shape, sizes, device))
        shapes[spec.name] = {i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str) and dims[d] is not None}
    try:
        with torch.no_grad():
            return torch.export.export(module, tuple(examples), dynamic_shapes=shapes)
    except Exception as e:
        raise DlmcError(f"{pass_name}: cannot export the rewritten step: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def _example_input(spec: TensorSpec, shape: list[int], sizes: dict[str, int], device) -> torch.Tensor:
    """A valid example input: in-range ids and row indices, all-True masks, increasing positions."""
    dtype = getattr(torch, spec.dtype)
    if spec.name == "head_rows":
        return torch.arange(sizes["rows"], device=device).expand(*shape).contiguous()
    if spec.name == "uniform":
        return torch.full(shape, 0.5, dtype=dtype, device=device)
    if spec.name == "temperature":
        return torch.ones(shape, dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    if dtype == torch.int64:  # ids and positions: distinct, in every vocabulary
        return (torch.arange(shape[-1], device=device) % 97).expand(*shape).contiguous()
    return torch.zeros(shape, dtype=dtype, device=device)


# The closed list of pass modules; importing them registers them. Order here means nothing.
from dlmc.passes import (  # noqa: E402
    block_cache,
    causal_cache,
    cpu_attention,
    delayed_kv,
    expert_sharing,
    fold_constants,
    fuse_decode,
    layer_skip,
    mixed_precision,
    quantize,
    rotate,
    triton_kernels,
    window_pruning,
)

__all__ = [
    "PASSES",
    "Pass",
    "PassConfig",
    "PassResult",
    "block_cache",
    "causal_cache",
    "cpu_attention",
    "delayed_kv",
    "expert_sharing",
    "fold_constants",
    "fuse_decode",
    "layer_skip",
    "mixed_precision",
    "pass_configs",
    "quantize",
    "reexport",
    "register",
    "rotate",
    "triton_kernels",
    "window_pruning",
]
