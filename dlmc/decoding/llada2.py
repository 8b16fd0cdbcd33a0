"""LLaDA2.0's `generate()` (`llada2`) and LLaDA2.1's token-editing `generate()` (`llada2_edit`).

Both official samplers live in the HF remote code of `LLaDA2MoeModelLM` (inclusionAI). They decode
block-causal blocks at absolute multiples of the model's block size; the prompt's last block (or the
first fully generated one) comes first, keeping its prompt tokens. Every forward covers everything
decided so far plus the open block, nothing after it, and is recomputed every step (no K/V cache).
Each step samples every position of the open block (temperature, top-k, top-p on the logits, then
softmax and one multinomial draw of [block, V]; temperature 0 takes the arg-max) and reads the
confidence p of the sampled token.

* `llada2` (2.0): `steps` steps per block (capped at gen_length // minimal_topk), each with a quota
  from the even schedule num_transfer_tokens(block_length, steps). A step commits every masked
  position with p > threshold when there are at least quota of them, else the quota most confident
  masked positions. The block ends when it has no masks or its steps are spent. The row stops after
  a block once the generated region holds a stop token; with `eos_early_stop` also right after a step
  that commits a stop token with no mask before the first one.
* `llada2_edit` (2.1): the block loops until it is settled. While masks remain, mask -> token (M2T)
  commits masked positions with p > threshold, else the `num_to_transfer` most confident. Every step
  also edits (T2T): an already-decided, non-prompt position of the block is overwritten when the
  sampled token differs and p > editing_threshold. Once no mask is left, at most `max_post_steps`
  further edit-only steps run; the block ends at the first step that starts without masks and edits
  nothing. Without `eos_early_stop` every block up to gen_length is decoded; with it the row stops
  after a block once its generated region is free of masks and holds a stop token.

Deliberate differences from the official files: the stop search covers the generated region only
(the official early stop also finds an EOS inside the prompt and then returns nothing), and a
`llada2_edit` step that only re-commits the mask token id, with nothing random left to change the next
step, is an error (the official loop repeats it forever). Committing the mask token otherwise leaves
the position masked, as in the official files.
Outputs follow `Generation`: gen_length tokens, tokens after the stop kept as produced, positions
never decided hold the fill id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dlmc.decoding.common import (
    CanvasCallback,
    Generation,
    Model,
    StepCallback,
    check_length,
    check_positive,
    check_prompts,
    check_sampling,
    fill_token_id,
    first_stop,
    forward_rows,
    model_device,
    num_transfer_tokens,
    pad_token_id,
    row_generator,
    top_k_filter,
    top_p_filter,
)
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec


def _check_probability(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise DlmcError(f"{name}={value} must lie in [0, 1] (it is compared with a probability)")


@dataclass(frozen=True, kw_only=True)
class _Common:
    """The fields both samplers share; each subclass validates them through `_check_common`."""

    gen_length: int = 128
    block_length: int | None = None
    """None = spec.block_size; any other value must equal it (the attention blocks are the decoding blocks)."""
    threshold: float = 0.95
    """Masked positions with confidence strictly above it are committed together."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_early_stop: bool = False
    stop_token_ids: tuple[int, ...] | None = None
    """None = the spec's EOS id alone: the official samplers take one `eos_id`."""

    def _check_common(self) -> None:
        check_positive("gen_length", self.gen_length)
        if self.block_length is not None:
            check_positive("block_length", self.block_length)
        _check_probability("threshold", self.threshold)
        check_sampling(self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True, kw_only=True)
class LLaDA2Config(_Common):
    steps: int | None = None
    """Steps per block; None = block_length (the official 32 for blocks of 32)."""
    minimal_topk: int = 1
    """The official cap: steps = min(steps, gen_length // minimal_topk)."""

    def __post_init__(self) -> None:
        self._check_common()
        if self.steps is not None:
            check_positive("steps", self.steps)
        check_positive("minimal_topk", self.minimal_topk)
        if self.minimal_topk > self.gen_length:
            raise DlmcError(f"minimal_topk={self.minimal_topk} exceeds gen_length={self.gen_length}; no step would run")


@dataclass(frozen=True, kw_only=True)
class LLaDA2EditConfig(_Common):
    editing_threshold: float = 0.9
    """Decided tokens are replaced by a different sample whose confidence is strictly above it."""
    max_post_steps: int = 16
    """Edit-only steps allowed after a block's last mask is filled."""
    num_to_transfer: int = 1
    """Masked positions committed when too few pass `threshold`."""

    def __post_init__(self) -> None:
        self._check_common()
        _check_probability("editing_threshold", self.editing_threshold)
        if self.max_post_steps < 0:
            raise DlmcError(f"max_post_steps={self.max_post_steps} must be >= 0")
        # 0 would commit nothing when no position passes the threshold: the block would never end
        check_positive("num_to_transfer", self.num_to_transfer)


@dataclass(eq=False)
class _Row:
    """One prompt's decoding state."""

    tokens: torch.Tensor
    """[T] int64: prompt, decided tokens, then the open block (masks included)."""
    prompt_len: int
    target_len: int
    """prompt_len + gen_length; the last block may run past it, the output stops there."""
    generator: torch.Generator
    block_start: int = 0
    step: int = 0
    """Steps taken in the open block (2.0: the index into the quota schedule)."""
    post_steps: int = 0
    """2.1: steps of the open block that started without masks."""
    nfe: int = 0
    """Forwards that included this row."""
    done: bool = False


def validate(spec: DenoiserSpec, prompts: Sequence[Sequence[int]], config: _Common) -> None:
    """Checks that need the model's spec or the prompts; the config checks itself on construction."""
    check_prompts(spec, prompts)
    if spec.attention != "block_causal" or spec.block_size is None:
        raise DlmcError(f"LLaDA2's samplers need a block-causal model, not spec.attention={spec.attention!r}")
    if spec.shift_logits:
        raise DlmcError("LLaDA2's samplers read same-position logits; this model shifts them (spec.shift_logits)")
    block_length = config.block_length or spec.block_size
    if block_length != spec.block_size:
        raise DlmcError(f"block_length={block_length} differs from the model's attention block ({spec.block_size})")
    longest = max(len(p) for p in prompts)
    end = -(-(longest + config.gen_length) // block_length) * block_length
    check_length(spec, end, f"prompt {longest} + gen_length {config.gen_length} rounded up to whole blocks")


StepRule = Callable[[_Row, torch.Tensor], None]
"""Advances a row from the logits [block_length, V] of its open block."""


def _drive(
    model: Model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: _Common,
    step: StepRule,
    prepare: Callable[[_Row], None] | None,
    seed: int,
    on_step: StepCallback | None,
    on_canvas: CanvasCallback | None,
    editing: bool,
) -> Generation:
    """The batch loop both samplers share: one forward over every unfinished row per step. `editing`:
    decided tokens of the open block may still change (2.1), so the canvas shows closed blocks only."""
    block_length = config.block_length or spec.block_size
    device = model_device(model)
    rows = [_new_row(prompt, spec, config, block_length, seed, device) for prompt in prompts]
    pad_id = pad_token_id(spec)
    nfe = 0
    while True:
        if prepare is not None:
            for row in rows:
                prepare(row)
        active = [row for row in rows if not row.done]
        if not active:
            break
        logits = forward_rows(model, [row.tokens for row in active], pad_id, sequences=[id(row) for row in active])
        nfe += 1
        for row, row_logits in zip(active, logits, strict=True):
            row.nfe += 1
            step(row, row_logits[row.block_start :])  # [block_length, V]
        if on_step is not None:
            on_step(nfe, sum(_decided(row, spec) for row in rows))
        if on_canvas is not None:
            on_canvas(torch.stack([_canvas(row, spec, config, editing) for row in rows]))  # [B, G]
    return Generation(output_ids=[_output(row, spec, config) for row in rows], nfe=nfe, row_nfe=[r.nfe for r in rows])


@torch.no_grad()
def generate(
    model: Model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: LLaDA2Config,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
    on_canvas: CanvasCallback | None = None,
) -> Generation:
    """LLaDA2.0's sampler."""
    validate(spec, prompts, config)
    block_length = config.block_length or spec.block_size
    steps = min(config.steps or block_length, config.gen_length // config.minimal_topk)
    schedule = num_transfer_tokens(block_length, steps)
    stops = _stop_ids(spec, config)

    def step(row: _Row, logits: torch.Tensor) -> None:
        block = row.tokens[row.block_start :]  # [block_length] int64 view
        tokens, probs = _sample(logits, config, row.generator, greedy_over_probs=True)  # [B], [B]
        masked = block == spec.mask_token_id  # [B] bool
        confidence = torch.where(masked, probs, float("-inf"))  # [B]
        quota = schedule[row.step]
        commit = confidence > config.threshold  # [B] bool
        if int(commit.sum()) < quota:
            commit = torch.zeros_like(masked)
            commit[torch.topk(confidence, min(quota, int(masked.sum()))).indices] = True
        block[commit] = tokens[commit]
        row.step += 1
        if config.eos_early_stop and _has_stop(tokens[commit], stops) and _settled_stop(row, spec, stops):
            row.done = True
        # the quotas add up to block_length, so the steps run out with masks left only when the model
        # committed the mask token itself; the official loop then moves on regardless
        elif not (block == spec.mask_token_id).any() or row.step == len(schedule):
            row.done = first_stop(row.tokens[row.prompt_len :], stops) is not None or _last_block(row)
            if not row.done:
                _open_block(row, block_length, spec)

    return _drive(model, spec, prompts, config, step, None, seed, on_step, on_canvas, editing=False)


@torch.no_grad()
def generate_edit(
    model: Model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: LLaDA2EditConfig,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
    on_canvas: CanvasCallback | None = None,
) -> Generation:
    """LLaDA2.1's sampler with token editing."""
    validate(spec, prompts, config)
    block_length = config.block_length or spec.block_size
    stops = _stop_ids(spec, config)

    def close_block(row: _Row) -> None:
        generated = row.tokens[row.prompt_len :]  # [T - P] int64
        settled = config.eos_early_stop and not (generated == spec.mask_token_id).any()
        row.done = (settled and first_stop(generated, stops) is not None) or _last_block(row)
        if not row.done:
            _open_block(row, block_length, spec)

    def prepare(row: _Row) -> None:
        """The official loop's head: a step that starts without masks counts as a post step."""
        if row.done or (row.tokens[row.block_start :] == spec.mask_token_id).any():
            return
        row.post_steps += 1
        if row.post_steps > config.max_post_steps:
            close_block(row)  # a newly opened block holds masks: it takes a step

    def step(row: _Row, logits: torch.Tensor) -> None:
        block = row.tokens[row.block_start :]  # [block_length] int64 view
        tokens, probs = _sample(logits, config, row.generator, greedy_over_probs=False)  # [B], [B]
        masked = block == spec.mask_token_id  # [B] bool
        commit = torch.zeros_like(masked)
        if masked.any():
            confidence = torch.where(masked, probs, float("-inf"))  # [B]
            commit = confidence > config.threshold
            if int(commit.sum()) < config.num_to_transfer:
                commit = torch.zeros_like(masked)
                commit[torch.topk(confidence, min(config.num_to_transfer, int(masked.sum()))).indices] = True
        positions = torch.arange(row.block_start, len(row.tokens), device=block.device)  # [B] int64
        editable = ~masked & (positions >= row.prompt_len)  # [B] bool
        edit = editable & (probs > config.editing_threshold) & (tokens != block)  # [B] bool
        changed = commit | edit
        # committing the mask token leaves a position masked; a step that changes nothing while masks
        # remain and draws deterministically repeats forever (the official loop never ends)
        if masked.any() and not (block[changed] != tokens[changed]).any() and _deterministic(config, probs):
            at = int(positions[changed][0])
            raise DlmcError(f"llada2_edit: the mask token keeps winning at position {at}; the block would never end")
        block[changed] = tokens[changed]
        if not masked.any() and not edit.any():
            close_block(row)

    return _drive(model, spec, prompts, config, step, prepare, seed, on_step, on_canvas, editing=True)


def _sample(
    logits: torch.Tensor, config: _Common, generator: torch.Generator, *, greedy_over_probs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], its probability [B]) for every row of logits [B, V], softmax in the logits dtype.

    At temperature 0 2.0 takes the arg-max of the probabilities, 2.1 of the logits: they differ only
    where logits a rounding step apart round to one probability (2.0 then takes the lower id)."""
    if config.temperature == 0:
        probs = torch.softmax(logits, dim=-1)  # [B, V]
        tokens = (probs if greedy_over_probs else logits).argmax(dim=-1)  # [B]
        return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if config.temperature != 1:
        logits = logits / config.temperature
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        logits = top_p_filter(logits, config.top_p, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    # one draw over the whole block, as the official [block, V] multinomial on the global generator
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _deterministic(config: _Common, probs: torch.Tensor) -> bool:
    """True when the next step on the same tokens draws the same tokens: greedy, or every draw certain."""
    return config.temperature == 0 or bool((probs == 1).all())


def _stop_ids(spec: DenoiserSpec, config: _Common) -> tuple[int, ...]:
    if config.stop_token_ids is not None:
        return config.stop_token_ids
    return () if spec.eos_token_id is None else (spec.eos_token_id,)


def _has_stop(tokens: torch.Tensor, stops: tuple[int, ...]) -> bool:
    return bool(stops) and bool(torch.isin(tokens, torch.tensor(stops, device=tokens.device)).any())


def _settled_stop(row: _Row, spec: DenoiserSpec, stops: tuple[int, ...]) -> bool:
    """True when the generated region holds a stop token and no mask before the first one."""
    generated = row.tokens[row.prompt_len :]  # [T - P] int64
    at = first_stop(generated, stops)
    return at is not None and not bool((generated[:at] == spec.mask_token_id).any())


def _last_block(row: _Row) -> bool:
    return len(row.tokens) >= row.target_len


def _new_row(
    prompt: list[int], spec: DenoiserSpec, config: _Common, block_length: int, seed: int, device: torch.device
) -> _Row:
    row = _Row(
        tokens=torch.tensor(prompt, dtype=torch.long, device=device),  # [P] int64
        prompt_len=len(prompt),
        target_len=len(prompt) + config.gen_length,
        generator=row_generator(seed, device),
    )
    _open_block(row, block_length, spec)
    return row


def _open_block(row: _Row, block_length: int, spec: DenoiserSpec) -> None:
    """Extend the tokens with masks to the end of the block holding the next position."""
    length = len(row.tokens)
    end = (length // block_length + 1) * block_length
    masks = torch.full((end - length,), spec.mask_token_id, dtype=torch.long, device=row.tokens.device)
    row.tokens = torch.cat([row.tokens, masks])  # [end] int64
    row.block_start = end - block_length
    row.step = row.post_steps = 0


def _decided(row: _Row, spec: DenoiserSpec) -> int:
    return int((row.tokens[row.prompt_len : row.target_len] != spec.mask_token_id).sum())


def _canvas(row: _Row, spec: DenoiserSpec, config: _Common, editing: bool) -> torch.Tensor:
    """The row's generated region [G] int64, masks where undecided or not reached yet. With `editing`, an
    unfinished row's open block reads as masks too: an edit may still replace any token in it, while a
    closed block never changes. A full block out of post steps is closed by the next loop head (the
    `prepare` of generate_edit) without another step, so it counts as closed already."""
    generated = row.tokens[row.prompt_len : row.target_len]  # [<= G] int64
    assert not editing or isinstance(config, LLaDA2EditConfig)
    full = not (row.tokens[row.block_start :] == spec.mask_token_id).any()
    closing = editing and full and row.post_steps + 1 > config.max_post_steps
    if editing and not row.done and not closing:
        generated = generated[: max(row.block_start - row.prompt_len, 0)]
    rest = generated.new_full((config.gen_length - len(generated),), spec.mask_token_id)  # [G - len] int64
    return torch.cat([generated, rest])


def _output(row: _Row, spec: DenoiserSpec, config: _Common) -> list[int]:
    """The generated tokens; positions never decided (the row stopped, or a mask was left) hold the fill id."""
    fill = fill_token_id(spec)
    generated = row.tokens[row.prompt_len : row.target_len].tolist()
    generated = [fill if t == spec.mask_token_id else t for t in generated]
    return generated + [fill] * (config.gen_length - len(generated))
