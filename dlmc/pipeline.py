"""run_passes: the recipe's passes, in the recipe's order, each one checked before the next runs.

Cut down from torch.fx's PassManager: after every pass the graph is linted and recompiled, the
ExportedProgram is re-validated by torch.export's verifier, and the recorded step signature must
still describe the graph's inputs and outputs. A failure names the pass and the ones before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dlmc.artifact import StepSignature
from dlmc.capture import StepProgram
from dlmc.errors import DlmcError, one_line
from dlmc.passes import PASSES, PassConfig


class PassError(DlmcError):
    """A pass raised, or left a graph that does not verify."""


def run_passes(
    program: StepProgram,
    configs: Sequence[PassConfig],
    *,
    on_pass: Callable[[PassConfig], None] | None = None,
    resolve: Callable[[StepProgram, PassConfig], PassConfig] | None = None,
) -> StepProgram:
    """`resolve` turns a config that depends on measurements (a layer_skip budget) into the config
    that runs, on the program as the earlier passes left it; `on_pass` sees the config that runs."""
    for i, config in enumerate(configs):
        if resolve is not None:
            config = resolve(program, config)
        if on_pass is not None:
            on_pass(config)
        before = [c.name for c in configs[:i]]
        try:
            program, _ = PASSES[type(config)](program, config)
        except DlmcError:
            raise
        except Exception as e:
            raise PassError(f"pass '{config.name}' failed (after {before or 'no passes'}): {one_line(e)}") from e
        try:
            check_program(program)
        except Exception as e:
            raise PassError(
                f"pass '{config.name}' left an invalid graph (after {before or 'no passes'}): {one_line(e)}"
            ) from e
    return program


def check_program(program: StepProgram) -> None:
    """The invariants every stage after capture relies on."""
    gm = program.graph_module
    gm.graph.lint()
    gm.recompile()
    program.exported.validate()
    check_signature(program.exported, program.signature)


def check_signature(exported: torch.export.ExportedProgram, signature: StepSignature) -> None:
    """The user inputs and outputs of the graph match the recorded signature by count and dtype."""
    placeholders = {n.name: n for n in exported.graph.find_nodes(op="placeholder")}
    user_inputs = [placeholders[name] for name in exported.graph_signature.user_inputs]
    if len(user_inputs) != len(signature.inputs):
        raise ValueError(f"graph has {len(user_inputs)} user inputs, the signature records {len(signature.inputs)}")
    for node, spec in zip(user_inputs, signature.inputs, strict=True):
        _check_dtype(node, spec.name, spec.dtype)
    returned = exported.graph.output_node().args[0]
    outputs = [
        node
        for node, out in zip(returned, exported.graph_signature.output_specs, strict=True)
        if out.kind.name == "USER_OUTPUT"
    ]
    if len(outputs) != len(signature.outputs):
        raise ValueError(f"graph has {len(outputs)} user outputs, the signature records {len(signature.outputs)}")
    for node, spec in zip(outputs, signature.outputs, strict=True):
        _check_dtype(node, spec.name, spec.dtype)


def _check_dtype(node: torch.fx.Node, name: str, dtype: str) -> None:
    actual = str(node.meta["val"].dtype).removeprefix("torch.")
    if actual != dtype:
        raise ValueError(f"step {name} is {actual} in the graph but {dtype} in the recorded signature")
