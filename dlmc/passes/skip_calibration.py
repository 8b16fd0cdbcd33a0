"""Measuring which blocks layer_skip may drop: the calibration canvases (prompts with their generation
region partly masked, from the recipe's source), the residual stream's cos(h_in, h_out) per block over
them, and the spread-out choice of the most redundant blocks (`dlmc.passes.layer_skip` explains why)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dlmc import tasks
from dlmc.capture import StepProgram
from dlmc.errors import DlmcError
from dlmc.passes.blocks import find_blocks
from dlmc.quant.calibration import calibration_source
from dlmc.quant.self_samples import PROMPT_TOKENS, self_samples
from dlmc.spec import DenoiserSpec

if TYPE_CHECKING:
    from dlmc.passes.layer_skip import LayerSkip

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
