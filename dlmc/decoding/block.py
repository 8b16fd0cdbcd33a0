"""Block diffusion for block-causal models: Fast-dLLM v2 (`generate`) and SDAR (`block_diffusion_generate`).

Blocks sit at absolute multiples of the block size; when the prompt ends inside a block, that block
is the first one decoded and keeps its prompt tokens. Every forward covers everything decided so far
plus the open block, and nothing after it: under block-causal attention this is what the official
samplers compute with their KV caches (committed blocks never see later ones).

With shifted logits (spec.shift_logits, Fast-dLLM v2) a block's first position has no row inside the
block to be predicted from, so it is decoded autoregressively: once a block (or a block-aligned
prompt) is complete, one forward over it yields the next token from its last row, greedily, and that
token opens the next block. Same-position models (SDAR) need no such step.

Remasking rules:

* "threshold" (Fast-dLLM v2): the block is decoded sub-block by sub-block. A step samples the
  sub-block (softmax of logits / T, then top-p on the probabilities) and commits every masked token
  whose probability exceeds `threshold`, and always the most probable one. The row stops as soon as
  a stop token has no mask before it.
* "low_confidence_static" / "low_confidence_dynamic" (SDAR): `denoising_steps` steps per block on the
  schedule num_transfer_tokens(block_length, denoising_steps). A step samples the whole block
  (temperature, top-k, top-p on the logits) and commits the k[step] most probable masked tokens; the
  dynamic rule commits every masked token above `threshold` instead when there are at least k[step]
  of them. The row stops after a block that holds a stop token.

Softmax runs in the model's logits dtype in both, as in the official files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
    check_unit_interval,
    fill_token_id,
    first_stop,
    forward_rows,
    model_device,
    num_transfer_tokens,
    pad_token_id,
    row_generator,
    shift_right,
    stop_token_ids,
    top_k_filter,
    top_p_filter,
)
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec

Remasking = Literal["threshold", "low_confidence_dynamic", "low_confidence_static"]
REMASKINGS: tuple[str, ...] = ("threshold", "low_confidence_dynamic", "low_confidence_static")


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    gen_length: int = 128
    block_length: int | None = None
    """None = spec.block_size; any other value must equal it (the model's attention blocks are the
    decoding blocks, as in both official samplers)."""
    remasking: Remasking = "threshold"
    threshold: float = 0.9
    """"threshold": commit probabilities strictly above it. "low_confidence_dynamic": the same test
    decides whether the confident tokens replace the scheduled count. Unused by the static rule."""
    sub_block_length: int | None = None
    """"threshold" only: sub-blocks decoded one after the other; None = the whole block (Fast-dLLM v2's
    own default is 8 with blocks of 32)."""
    denoising_steps: int | None = None
    """SDAR rules only: steps per block; None = block_length (one token per step)."""
    temperature: float = 0.0
    top_k: int | None = None
    """SDAR rules only (Fast-dLLM v2 samples with top-p alone)."""
    top_p: float | None = None
    stop_token_ids: tuple[int, ...] | None = None
    """None = the spec's EOS and end-of-turn ids."""

    def __post_init__(self) -> None:
        check_positive("gen_length", self.gen_length)
        if self.block_length is not None:
            check_positive("block_length", self.block_length)
        if self.remasking not in REMASKINGS:
            raise DlmcError(f"remasking={self.remasking!r} is not one of {', '.join(REMASKINGS)}")
        check_unit_interval("threshold", self.threshold)
        check_sampling(self.temperature, self.top_k, self.top_p)
        threshold_rule = self.remasking == "threshold"
        if self.sub_block_length is not None:
            check_positive("sub_block_length", self.sub_block_length)
            if not threshold_rule:
                raise DlmcError(f"sub_block_length is only read by remasking='threshold', not {self.remasking!r}")
        if self.denoising_steps is not None:
            check_positive("denoising_steps", self.denoising_steps)
            if threshold_rule:
                raise DlmcError("denoising_steps is not read by remasking='threshold'; it steps until a block is full")
        if self.top_k is not None and threshold_rule:
            raise DlmcError("top_k is not supported by remasking='threshold' (Fast-dLLM v2 samples with top-p only)")


@dataclass(frozen=True)
class _Plan:
    """The config with its spec-dependent defaults resolved."""

    block_length: int
    sub_block_length: int
    schedule: tuple[int, ...]
    """SDAR rules: tokens to commit at each denoising step of a block."""
    stop_ids: tuple[int, ...]
    shift: bool


@dataclass(eq=False)
class _Row:
    """One prompt's decoding state."""

    tokens: torch.Tensor
    """[T] int64: prompt, decided tokens, then the open block (masks included) when one is open."""
    prompt_len: int
    target_len: int
    """prompt_len + gen_length: the row is done once this many tokens are decided."""
    generator: torch.Generator
    block_start: int = 0
    awaiting_ar: bool = False
    """True when the next forward yields the token that opens the next block (shifted models)."""
    step: int = 0
    """Steps taken in the open block."""
    done: bool = False
    nfe: int = 0
    """Model calls that included this row."""


def validate(spec: DenoiserSpec, prompts: Sequence[Sequence[int]], config: BlockConfig) -> None:
    """Checks that need the model's spec or the prompts; the config checks itself on construction."""
    check_prompts(spec, prompts)
    if spec.attention != "block_causal" or spec.block_size is None:
        raise DlmcError(f"the block decoder needs a block-causal model, not spec.attention={spec.attention!r}")
    block_length = config.block_length or spec.block_size
    if block_length != spec.block_size:
        raise DlmcError(f"block_length={block_length} differs from the model's attention block ({spec.block_size})")
    sub_block_length = config.sub_block_length or block_length
    if block_length % sub_block_length:
        raise DlmcError(f"block_length={block_length} is not a multiple of sub_block_length={sub_block_length}")
    longest = max(len(p) for p in prompts)
    end = -(-(longest + config.gen_length) // block_length) * block_length
    check_length(spec, end, f"prompt {longest} + gen_length {config.gen_length} rounded up to whole blocks")


@torch.no_grad()
def generate(
    model: Model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: BlockConfig,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
    on_canvas: CanvasCallback | None = None,
) -> Generation:
    validate(spec, prompts, config)
    plan = _plan(spec, config)
    device = model_device(model)
    rows = [_new_row(prompt, spec, config, plan, seed, device) for prompt in prompts]
    pad_id = pad_token_id(spec)
    nfe = 0
    while True:
        if config.remasking == "threshold":
            for row in rows:
                row.done = row.done or _stopped(row, plan, spec)
        active = [row for row in rows if not row.done]
        if not active:
            break
        logits = forward_rows(model, [row.tokens for row in active], pad_id, sequences=[id(row) for row in active])
        nfe += 1
        for row, row_logits in zip(active, logits, strict=True):
            row.nfe += 1
            if row.awaiting_ar:
                _ar_step(row, row_logits, spec, config, plan)
            else:
                _denoise_step(row, row_logits, spec, config, plan)
        if on_step is not None:
            on_step(nfe, sum(_decided(row, spec) for row in rows))
        if on_canvas is not None:
            on_canvas(torch.stack([_canvas(row, spec, config) for row in rows]))  # [B, G]
    return Generation(output_ids=[_output(row, spec, config) for row in rows], nfe=nfe, row_nfe=[r.nfe for r in rows])


def _plan(spec: DenoiserSpec, config: BlockConfig) -> _Plan:
    block_length = config.block_length or spec.block_size
    assert block_length is not None  # validate() checked spec.block_size
    return _Plan(
        block_length=block_length,
        sub_block_length=config.sub_block_length or block_length,
        schedule=tuple(num_transfer_tokens(block_length, config.denoising_steps or block_length)),
        stop_ids=stop_token_ids(spec, config.stop_token_ids),
        shift=spec.shift_logits,
    )


def _new_row(
    prompt: list[int], spec: DenoiserSpec, config: BlockConfig, plan: _Plan, seed: int, device: torch.device
) -> _Row:
    row = _Row(
        tokens=torch.tensor(prompt, dtype=torch.long, device=device),  # [P] int64
        prompt_len=len(prompt),
        target_len=len(prompt) + config.gen_length,
        generator=row_generator(seed, device),
    )
    if plan.shift and len(prompt) % plan.block_length == 0:
        row.awaiting_ar = True  # the prompt fills its last block: the next token comes from its last row
    else:
        _open_block(row, plan, spec)
    return row


def _open_block(row: _Row, plan: _Plan, spec: DenoiserSpec) -> None:
    """Extend the tokens with masks to the end of the block holding the next position."""
    length = len(row.tokens)
    end = (length // plan.block_length + 1) * plan.block_length  # the block holding position `length`
    masks = torch.full((end - length,), spec.mask_token_id, dtype=torch.long, device=row.tokens.device)
    row.tokens = torch.cat([row.tokens, masks])  # [end] int64
    row.block_start = end - plan.block_length
    row.step = 0


def _ar_step(row: _Row, logits: torch.Tensor, spec: DenoiserSpec, config: BlockConfig, plan: _Plan) -> None:
    """Append the greedy next token read from the last row (raw logits: it predicts the next position)."""
    next_token = logits[-1].argmax().view(1)  # [1] int64
    row.tokens = torch.cat([row.tokens, next_token])
    row.awaiting_ar = False
    if _finished(row, spec, config, plan):
        row.done = True
    else:
        _open_block(row, plan, spec)


def _denoise_step(row: _Row, logits: torch.Tensor, spec: DenoiserSpec, config: BlockConfig, plan: _Plan) -> None:
    aligned = shift_right(logits) if plan.shift else logits  # [T, V], row i predicts position i
    masks = row.tokens[row.block_start :] == spec.mask_token_id  # [block_length] bool, before the step
    if config.remasking == "threshold":
        _threshold_commit(row, aligned, spec, config, plan)
    else:
        _scheduled_commit(row, aligned, spec, config, plan)
    row.step += 1
    stalled = torch.equal(row.tokens[row.block_start :] == spec.mask_token_id, masks)
    if stalled and config.temperature == 0:  # committing the mask token changes nothing: the same step forever
        at = row.block_start + int(masks.nonzero()[0, 0])
        raise DlmcError(f"block: the model predicts the mask token itself at position {at} at temperature 0; "
                        "the block would never end")
    if (row.tokens[row.block_start :] == spec.mask_token_id).any():
        return
    if _finished(row, spec, config, plan):
        row.done = True
    elif plan.shift:
        row.awaiting_ar = True
    else:
        _open_block(row, plan, spec)


def _finished(row: _Row, spec: DenoiserSpec, config: BlockConfig, plan: _Plan) -> bool:
    """Checked whenever every token so far is decided (a block just completed, or an AR step)."""
    if len(row.tokens) >= row.target_len:
        return True
    # SDAR checks for a stop token after each block; Fast-dLLM v2 before every forward (in generate)
    return config.remasking != "threshold" and _stopped(row, plan, spec)


def _stopped(row: _Row, plan: _Plan, spec: DenoiserSpec) -> bool:
    """True when a generated stop token has no mask before it: nothing before it can change any more."""
    generated = row.tokens[row.prompt_len :]  # [T - P] int64
    at = first_stop(generated, plan.stop_ids)
    return at is not None and not bool((generated[:at] == spec.mask_token_id).any())


def _threshold_commit(row: _Row, logits: torch.Tensor, spec: DenoiserSpec, config: BlockConfig, plan: _Plan) -> None:
    """Fast-dLLM v2 step on the first sub-block that still has masks."""
    block = row.tokens[row.block_start :]  # [block_length] int64 view
    first_mask = int((block == spec.mask_token_id).nonzero()[0, 0])
    start = row.block_start + first_mask // plan.sub_block_length * plan.sub_block_length
    span = slice(start, start + plan.sub_block_length)
    tokens, probs = _nucleus_sample(logits[span], config, row.generator)  # [S], [S, V]
    masked = row.tokens[span] == spec.mask_token_id  # [S] bool
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [S]
    confidence = torch.where(masked, confidence, float("-inf"))
    commit = confidence > config.threshold  # [S] bool
    commit[confidence.argmax()] = True
    commit &= masked
    row.tokens[span][commit] = tokens[commit]


def _nucleus_sample(
    logits: torch.Tensor, config: BlockConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM v2's sampler: (token [S], probabilities [S, V] the token was drawn from)."""
    if config.temperature == 0:
        probs = torch.softmax(logits, dim=-1)  # [S, V]
        return probs.argmax(dim=-1), probs
    probs = torch.softmax(logits / config.temperature, dim=-1)  # [S, V]
    if config.top_p is not None:
        probs = _top_p_probs(probs, config.top_p)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [S]
    return tokens, probs


def _top_p_probs(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p on probabilities (zeroed, then renormalised), as Fast-dLLM v2 filters."""
    sorted_probs, order = torch.sort(probs, descending=True)  # [S, V], [S, V]
    drop_sorted = sorted_probs.cumsum(dim=-1) > p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [S, V] back in vocab order
    kept = probs.masked_fill(drop, 0)
    return kept / kept.sum(dim=-1, keepdim=True)


def _scheduled_commit(row: _Row, logits: torch.Tensor, spec: DenoiserSpec, config: BlockConfig, plan: _Plan) -> None:
    """SDAR step on the whole open block."""
    block = slice(row.block_start, None)
    tokens, token_probs = _filtered_sample(logits[block], config, row.generator)  # [B], [B]
    masked = row.tokens[block] == spec.mask_token_id  # [B] bool
    confidence = torch.where(masked, token_probs, float("-inf"))  # [B]
    # The official schedule can ask for more tokens than the block has masks (the first block starts
    # with prompt tokens), and then overwrites decided tokens with fresh samples; never ask for more.
    count = min(plan.schedule[row.step], int(masked.sum()))
    chosen = torch.topk(confidence, count).indices  # [count]
    if config.remasking == "low_confidence_dynamic":
        confident = confidence > config.threshold  # [B] bool
        if int(confident.sum()) >= count:
            chosen = confident.nonzero().squeeze(-1)
    row.tokens[block][chosen] = tokens[chosen]


def _filtered_sample(
    logits: torch.Tensor, config: BlockConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDAR's sampler: (token [B], its probability [B]). Temperature 0 takes the arg-max."""
    if config.temperature > 0:
        logits = logits / config.temperature
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        logits = top_p_filter(logits, config.top_p, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    if config.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]
    else:
        tokens = probs.argmax(dim=-1)  # [B]
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _decided(row: _Row, spec: DenoiserSpec) -> int:
    return int((row.tokens[row.prompt_len : row.target_len] != spec.mask_token_id).sum())


def _canvas(row: _Row, spec: DenoiserSpec, config: BlockConfig) -> torch.Tensor:
    """The row's generated region [G] int64, masks where undecided or not reached yet. Decided tokens are
    never rewritten (both rules commit masked positions only), so its settled prefix only grows."""
    generated = row.tokens[row.prompt_len : row.target_len]  # [<= G] int64
    rest = generated.new_full((config.gen_length - len(generated),), spec.mask_token_id)  # [G - len] int64
    return torch.cat([generated, rest])


def _output(row: _Row, spec: DenoiserSpec, config: BlockConfig) -> list[int]:
    """The generated tokens; positions a stopped row never decided hold the fill id."""
    fill = fill_token_id(spec)
    generated = row.tokens[row.prompt_len : row.target_len].tolist()
    generated = [fill if t == spec.mask_token_id else t for t in generated]
    return generated + [fill] * (config.gen_length - len(generated))
