"""layer_skip: drop whole transformer blocks from the step; the residual stream passes through them.

A block computes x + f(x). Where f(x) is small next to x (cosine of the block's input and output
near 1) the block can be replaced by the identity. Which blocks, is measured: `calibrate` runs the
step on calibration canvases (prompts with their generation region partly masked, as in the middle
of denoising), records the residual stream entering and leaving each `layers.N`, and averages
cos(h_in, h_out) over the real tokens. `choose_layers` then takes the most redundant blocks, spread
out (skipping adjacent blocks degrades more steeply, arXiv 2603.07475) and never the first block
unless it is listed by hand (dLLMs keep a super-outlier there, arXiv 2605.06366). The skip is
static: the same blocks for every prompt, step and token.

The rewrite is real: the block's nodes are erased, its users read the block's input, and its now
unread weights leave the state dict, so the artifact shrinks with the step. The pass is
approximate; its oracle is the eager model with those blocks removed from `model.layers`.

A recipe gives either `layers` (explicit, original numbering) or `budget` (how many to drop). A
budget is resolved to layers by `resolve`, which the compiler calls just before the pass runs, on
the step as the earlier passes left it; the artifact records the resolved layers and the
measured similarities.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from dlmc.capture import STEP_INPUTS, StepProgram
from dlmc.errors import DlmcError
from dlmc.passes import PassConfig, PassResult, copy_graph, input_kinds, rebuild, register
from dlmc.passes.blocks import find_blocks, outside_layers
from dlmc.passes.skip_calibration import Calibration, calibrate, calibration_batches, choose_layers, step_device

log = logging.getLogger(__name__)

STATE_KINDS = {"PARAMETER", "BUFFER", "CONSTANT_TENSOR"}


@dataclass(frozen=True, kw_only=True)
class LayerSkip(PassConfig):
    """Remove the listed transformer blocks (`layers`), or the `budget` most redundant ones."""

    name: ClassVar[str] = "layer_skip"
    exact: ClassVar[bool] = False
    layers: tuple[int, ...] | None = None
    """Blocks to remove, by their index in the checkpoint (0 = the first). [] removes nothing."""
    budget: int | None = None
    """How many blocks to remove, chosen by calibration (never block 0). Excludes `layers`."""
    criterion: Literal["similarity", "logits"] = "similarity"
    """How a budget is spent. similarity: the blocks with the highest mean cos(h_in, h_out), spread
    out (the paper's measure; one calibration run). logits: greedily, the block whose removal (on
    top of those already chosen) keeps the step's arg-max token at the most masked positions of the
    calibration canvases (budget x layers calibration runs; measures what decoding sees)."""
    source: Literal["tasks", "file", "self", "random"] | None = None
    """What the calibration canvases hold. tasks: `examples` task prompts with their answers, from the
    training distribution of dlmc.tasks (never the held-out set): the embedded model's own toy tasks,
    refused for any other checkpoint; file: your prompts (`prompts`, and one per line of `file`) with
    a fully masked generation region; self: `examples` sequences the model writes itself
    (dlmc.quant.self_samples); random: uniform token ids. None: file when prompts are given, else
    tasks for the embedded model and self for any other."""
    prompts: tuple[str, ...] = ()
    """Calibration prompts (text), for source file."""
    file: str | None = None
    """A text file of calibration prompts, one per line, for source file."""
    examples: int = 32
    """Calibration canvases of sources tasks, self and random."""
    gen_length: int = 64
    """Generation region of each calibration canvas."""
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.layers is None) == (self.budget is None):
            raise ValueError("layers: give exactly one of 'layers' (explicit list) and 'budget' (number to drop)")
        if self.layers is not None:
            if any(i < 0 for i in self.layers):
                raise ValueError(f"layers: indices must be >= 0, got {list(self.layers)}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers: an index is listed twice in {list(self.layers)}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget: must be >= 1, got {self.budget}")
        if self.source not in (None, "file") and (self.prompts or self.file):
            raise ValueError(f"source: {self.source} does not read prompts; give source: file or leave it out")
        if self.source == "file" and not (self.prompts or self.file):
            raise ValueError("source: file needs `prompts` or a `file` of prompts, one per line")
        if self.examples < 1:
            raise ValueError(f"examples: must be >= 1, got {self.examples}")
        if self.gen_length < 1:
            raise ValueError(f"gen_length: must be >= 1, got {self.gen_length}")


@register(LayerSkip)
def layer_skip(program: StepProgram, config: LayerSkip) -> PassResult:
    if config.layers is None:
        raise DlmcError("layer_skip.budget: not resolved to layers; calibrate first (layer_skip.resolve)")
    check_plain_step(program)
    gm = copy_graph(program)
    blocks = find_blocks(gm)
    check_layers(config.layers, sorted(blocks))
    if not config.layers:
        return PassResult(program, False)
    for index in sorted(config.layers, reverse=True):
        block = blocks[index]
        block.output.replace_all_uses_with(block.input)
        for node in reversed(block.nodes):  # users before producers
            gm.graph.erase_node(node)
        for node in reversed(block.shared):
            if not node.users:  # asserts included: they only checked values nothing reads any more
                gm.graph.erase_node(node)
            else:  # still read by later blocks: it belongs to the model now, not to a removed block
                node.meta["nn_module_stack"] = outside_layers(node.meta["nn_module_stack"])
    gm.graph.eliminate_dead_code()
    kinds = input_kinds(program)
    state_dict, constants = dict(program.exported.state_dict), dict(program.exported.constants)
    for node in list(gm.graph.find_nodes(op="placeholder")):
        kind, key = kinds[node.name]
        if not node.users and kind in STATE_KINDS:
            gm.graph.erase_node(node)
            state_dict.pop(key, None)
            constants.pop(key, None)
    gm.graph.lint()
    gm.recompile()
    log.debug("layer_skip: removed layers %s", sorted(config.layers))
    return PassResult(rebuild(program, gm, state_dict=state_dict, constants=constants), True)


def check_plain_step(program: StepProgram) -> None:
    """Blocks are found by the residual stream alone; a step another pass gave more inputs (a K/V
    cache) has more values leaving each block, so layer_skip must run before such passes."""
    names = tuple(t.name for t in program.signature.inputs)
    if names != STEP_INPUTS:
        raise DlmcError(f"layer_skip: put it before the passes that change the step's inputs (this step takes "
                        f"{', '.join(names)})")


def check_layers(layers: Sequence[int], present: Sequence[int]) -> None:
    missing = [i for i in layers if i not in present]
    if missing:
        have = f"0-{present[-1]}" if list(present) == list(range(len(present))) else ", ".join(map(str, present))
        raise DlmcError(f"layer_skip.layers: layer {missing[0]} is not in the step (it has layers {have})")
    if layers and len(layers) >= len(present):
        raise DlmcError(f"layer_skip.layers: cannot drop all {len(present)} layers")


def resolve(
    program: StepProgram, config: PassConfig, tokenizer: Any, model_dir: str | Path | None = None, model: Any = None
) -> tuple[PassConfig, Calibration | None]:
    """A layer_skip with a budget becomes one with explicit layers, chosen by calibrating `program`
    (the step as the passes before this one left it). Any other config comes back unchanged.
    `model_dir` is the checkpoint's (None: not the embedded model); source self samples from `model`,
    else from `program`."""
    if not isinstance(config, LayerSkip) or config.budget is None:
        return config, None
    check_plain_step(program)
    present = len(find_blocks(program.graph_module))
    if config.budget >= present:
        raise DlmcError(f"layer_skip.budget: must be between 1 and {present - 1} (the step has {present} layers "
                        f"and keeps the first), got {config.budget}")
    sig = program.signature
    batches = calibration_batches(
        program.spec, tokenizer, config, batch_size=min(8, sig.batch[1]), max_length=sig.seq[1],
        model_dir=model_dir, model=model if model is not None else program, device=step_device(program),
    )
    calibration = calibrate(program, batches)
    if config.criterion == "similarity":
        return LayerSkip(layers=choose_layers(calibration.similarity, config.budget)), calibration
    layers, agreement = choose_by_logits(program, batches, config.budget)
    return LayerSkip(layers=layers), dataclasses.replace(calibration, agreement=agreement)


def choose_by_logits(
    program: StepProgram, batches: Sequence[tuple[torch.Tensor, ...]], budget: int
) -> tuple[tuple[int, ...], dict[int, float]]:
    """Greedy: each round removes the block (never the first) whose removal, on top of the blocks
    already chosen, keeps the full step's arg-max token at the most masked positions. Returns the
    choice and the first round's scores."""
    mask_id = program.spec.mask_token_id
    wanted = []  # per batch: (positions whose logits predict a masked token [B, L] bool, full arg-max)
    for input_ids, attention_mask, position_ids in batches:
        masked = (input_ids == mask_id) & attention_mask  # [B, L] bool
        if program.spec.shift_logits:  # the logits at i predict token i + 1 (Dream)
            masked = torch.cat([masked[:, 1:], torch.zeros_like(masked[:, :1])], dim=1)
        wanted.append((masked, program(input_ids, attention_mask, position_ids).argmax(-1)))
    if not any(m.any() for m, _ in wanted):
        raise DlmcError("layer_skip.criterion: logits needs masked positions in the calibration canvases")
    chosen: list[int] = []
    first: dict[int, float] = {}
    candidates = [i for i in sorted(find_blocks(program.graph_module)) if i != 0]
    for _ in range(budget):
        scores = {}
        for index in (i for i in candidates if i not in chosen):
            trial = layer_skip(program, LayerSkip(layers=(*chosen, index))).program
            kept = total = 0
            for (input_ids, attention_mask, position_ids), (masked, full) in zip(batches, wanted, strict=True):
                tokens = trial(input_ids, attention_mask, position_ids).argmax(-1)  # [B, L] int64
                kept += int((tokens == full)[masked].sum())
                total += int(masked.sum())
            scores[index] = kept / total
        first = first or scores
        chosen.append(max(scores, key=lambda i: (scores[i], -i)))
    return tuple(chosen), first
