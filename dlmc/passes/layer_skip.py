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
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from dlmc import tasks
from dlmc.capture import STEP_INPUTS, StepProgram
from dlmc.errors import DlmcError
from dlmc.passes import PassConfig, PassResult, copy_graph, input_kinds, rebuild, register
from dlmc.passes.blocks import find_blocks, outside_layers
from dlmc.quant.calibration import calibration_source
from dlmc.quant.self_samples import PROMPT_TOKENS, self_samples
from dlmc.spec import DenoiserSpec

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


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    similarity: dict[int, float]
    """Layer index -> mean cos(h_in, h_out) over the calibration tokens (1.0: the block does nothing)."""
    canvases: int
    tokens: int
    agreement: dict[int, float] | None = None
    """criterion logits: layer index -> fraction of masked positions whose arg-max token survives
    removing that layer alone (the first greedy round)."""

    def to_dict(self) -> dict[str, Any]:
        out = {"similarity": {str(i): round(s, 6) for i, s in self.similarity.items()},
               "canvases": self.canvases, "tokens": self.tokens}
        if self.agreement is not None:
            out["agreement"] = {str(i): round(a, 6) for i, a in self.agreement.items()}
        return out

    def summary(self) -> str:
        text = " ".join(f"{i}:{s:.3f}" for i, s in sorted(self.similarity.items()))
        if self.agreement is not None:
            kept = " ".join(f"{i}:{a:.3f}" for i, a in sorted(self.agreement.items()))
            text += f"; arg-max kept without each layer {kept}"
        return text

    def table(self, chosen: Sequence[int] = ()) -> str:
        extra = self.agreement is not None
        lines = [f"{'layer':>5}  {'cos(in, out)':>12}" + ("  arg-max kept without it" if extra else "")]
        for index, sim in sorted(self.similarity.items()):
            note = "  skip" if index in chosen else ("  (first layer: kept unless listed)" if index == 0 else "")
            kept = ""
            if extra:
                kept = f"  {self.agreement[index]:24.4f}" if index in self.agreement else " " * 26
            lines.append(f"{index:5d}  {sim:12.4f}{kept}{note}")
        return "\n".join(lines)


def choose_layers(similarity: dict[int, float], budget: int) -> tuple[int, ...]:
    """The `budget` most redundant layers, never the first; non-adjacent ones first, then the rest.
    Returned most redundant first."""
    layers = sorted(similarity)
    candidates = sorted((i for i in layers if i != 0), key=lambda i: (-similarity[i], i))
    if not 1 <= budget < len(layers):
        raise DlmcError(f"layer_skip.budget: must be between 1 and {len(layers) - 1} (the step has {len(layers)} "
                        f"layers and keeps the first), got {budget}")
    chosen: list[int] = []
    for index in candidates:  # greedy, most similar first, no two adjacent
        if len(chosen) < budget and all(abs(index - c) > 1 for c in chosen):
            chosen.append(index)
    for index in candidates:  # a budget too large for spread-out layers takes adjacent ones too
        if len(chosen) < budget and index not in chosen:
            chosen.append(index)
    return tuple(chosen)


def calibrate(program: StepProgram, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Calibration:
    """Mean cos(h_in, h_out) of every block over the real tokens of `batches` of step inputs."""
    gm = program.graph_module
    blocks = find_blocks(gm)
    if not blocks:
        raise DlmcError("layer_skip: the step has no transformer blocks (no nodes under layers.N)")
    watched = {b.input for b in blocks.values()} | {b.output for b in blocks.values()}
    totals = dict.fromkeys(blocks, 0.0)
    tokens = canvases = 0
    for input_ids, attention_mask, position_ids in batches:
        values = _Recorder(gm, watched).record(program, (input_ids, attention_mask, position_ids))
        real = attention_mask.reshape(-1)  # [B*L] bool
        for index, block in blocks.items():
            h_in = values[block.input].reshape(-1, values[block.input].shape[-1])[real].double()  # [T, d]
            h_out = values[block.output].reshape(-1, values[block.output].shape[-1])[real].double()
            totals[index] += torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum().item()
        tokens += int(real.sum())
        canvases += input_ids.shape[0]
    return Calibration({i: totals[i] / tokens for i in sorted(blocks)}, canvases, tokens)


class _Recorder(torch.fx.Interpreter):
    """Runs the step's graph node by node and keeps the values of the watched nodes."""

    def __init__(self, gm: torch.fx.GraphModule, watched: set[torch.fx.Node]):
        super().__init__(gm)
        self.watched = watched
        self.values: dict[torch.fx.Node, torch.Tensor] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        if node in self.watched:
            self.values[node] = value
        return value

    def record(self, program: StepProgram, user_inputs: tuple[torch.Tensor, ...]) -> dict[torch.fx.Node, torch.Tensor]:
        ep = program.exported
        remaining = iter(user_inputs)
        args = []
        for spec in ep.graph_signature.input_specs:
            kind = spec.kind.name
            if kind == "USER_INPUT":
                args.append(next(remaining))
            elif kind == "CONSTANT_TENSOR" or spec.target in ep.constants:
                args.append(ep.constants[spec.target])
            else:
                args.append(ep.state_dict[spec.target])
        with torch.no_grad():
            self.run(*args)
        return self.values


def calibration_batches(
    spec: DenoiserSpec, tokenizer: Any, config: LayerSkip, *, batch_size: int = 8, max_length: int | None = None,
    model_dir: str | Path | None = None, model: Any = None, device: str | torch.device = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Step inputs that look like the middle of denoising: [prompt | generation region], left-padded.

    Canvases with an answer (a task's, or the model's own for source self) carry it followed by
    end-of-sequence tokens, each position masked with a probability that runs from near 0 to near 1
    across the canvases (early to late in the decode). User prompts, whose answers are unknown, get a
    fully masked region (the first step). `model_dir` says whether the checkpoint is the embedded model
    (the only one the tasks describe); `model` (a float model or a plain step) is what source self
    samples from. The batches are built on `device`, the step's (its weights'), so a CUDA step is fed
    CUDA tensors."""
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    fill = spec.eos_token_id if spec.eos_token_id is not None else spec.mask_token_id
    max_length = max_length or spec.max_length
    pairs = _pairs(spec, tokenizer, config, rng, max_length, model_dir, model)
    longest = max(len(p) for p, _ in pairs)
    gen_length = min(config.gen_length, max_length - longest)
    if gen_length < 1:
        raise DlmcError(f"layer_skip.prompts: a prompt of {longest} tokens leaves no room in the step's {max_length}")
    rows = []
    for i, (prompt, answer) in enumerate(pairs):
        region = torch.full((gen_length,), spec.mask_token_id, dtype=torch.long)  # [G] int64
        if answer is not None:
            target = (answer + [fill] * gen_length)[:gen_length]
            keep = torch.rand(gen_length, generator=generator) >= (i + 0.5) / len(pairs)  # [G] bool
            region = torch.where(keep, torch.tensor(target), region)
        rows.append(torch.cat([torch.tensor(prompt, dtype=torch.long), region]))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), length), fill, dtype=torch.long)  # [B, L] int64
        attention_mask = torch.zeros(len(chunk), length, dtype=torch.bool)  # [B, L] bool
        for b, row in enumerate(chunk):
            input_ids[b, length - len(row) :] = row
            attention_mask[b, length - len(row) :] = True
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L] int64
        batches.append((input_ids.to(device), attention_mask.to(device), position_ids.to(device)))
    return batches


def step_device(program: StepProgram) -> torch.device:
    """Where the step's weights live (the CPU for a step without any)."""
    ep = program.exported
    for tensor in (*ep.state_dict.values(), *ep.constants.values()):
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")


def _pairs(
    spec: DenoiserSpec, tokenizer: Any, config: LayerSkip, rng: random.Random, max_length: int,
    model_dir: str | Path | None, model: Any,
) -> list[tuple[list[int], list[int] | None]]:
    """(prompt ids, answer ids or None) of every calibration canvas, from the config's source."""
    given = "file" if config.prompts or config.file else config.source
    source = calibration_source(given, Path(model_dir) if model_dir is not None else None, "layer_skip.source")
    if source == "file":
        return [(ids, None) for ids in _user_prompts(tokenizer, config)]
    if source == "tasks":
        if tokenizer is None:
            raise DlmcError("layer_skip.source: tasks needs the checkpoint's tokenizer, and there is none")
        examples = _training_examples(rng, config.examples)
        return [(tokenizer.encode(e.prompt), tokenizer.encode(e.answer)) for e in examples]
    if source == "self":
        if model is None:
            raise DlmcError("layer_skip.source: self samples from the model, and none was given")
        length = min(PROMPT_TOKENS + config.gen_length, max_length)
        return [(p, g) for p, g in self_samples(model, spec, config.examples, length, config.seed)]
    special = {spec.mask_token_id, spec.eos_token_id, spec.pad_token_id, spec.eot_token_id}
    pool = [i for i in range(min(spec.vocab_size, 1000)) if i not in special]
    return [([rng.choice(pool) for _ in range(16)], [rng.choice(pool) for _ in range(config.gen_length)])
            for _ in range(config.examples)]


def _user_prompts(tokenizer: Any, config: LayerSkip) -> list[list[int]]:
    """The token ids of `prompts` and of every non-empty line of `file`."""
    if tokenizer is None:
        raise DlmcError("layer_skip.prompts: the model has no tokenizer to encode them")
    texts = list(config.prompts)
    if config.file is not None:
        path = Path(config.file)
        if not path.is_file():
            raise DlmcError(f"layer_skip.file: {path}: file not found")
        try:
            texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise DlmcError(f"layer_skip.file: {path}: not a text file") from None
    ids = [tokenizer.encode(text) for text in texts]
    if not ids or not all(ids):
        raise DlmcError("layer_skip.prompts: no prompts, or a prompt that encodes to no tokens")
    return ids


def _training_examples(rng: random.Random, count: int) -> list[tasks.Example]:
    held_out = {e.prompt for e in tasks.held_out()}
    out: list[tasks.Example] = []
    while len(out) < count:
        example = tasks.sample(rng)
        if example.prompt not in held_out:
            out.append(example)
    return out


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
