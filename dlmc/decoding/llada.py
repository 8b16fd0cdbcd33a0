"""LLaDA's sampler (ML-GSAI/LLaDA `generate`) and Fast-dLLM v1's confidence-aware parallel decoding.

The canvas is [prompt | gen_length masks]. It is decoded block by block (semi-autoregressive when
block_length < gen_length); every step runs the model over the whole canvas, picks a token for every
masked position and commits some of them inside the current block:

* default (LLaDA): the `num_transfer_tokens` schedule says how many, the highest-confidence first
  ("low_confidence") or in random order ("random"); `steps / num_blocks` steps per block;
* `threshold` (Fast-dLLM v1): every masked token of the block whose confidence reaches the threshold,
  and always the most confident one; the block repeats until it is full;
* `factor` (Fast-dLLM v1): the longest confidence-sorted prefix whose j-th token reaches
  1 - factor / (j + 1); the block repeats until it is full.

Confidence softmax precision follows each official file: LLaDA softmaxes in the model's logits dtype;
Fast-dLLM (threshold / factor) softmaxes in float64. Gumbel noise is float64 in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dlmc import strategies

from dlmc.decoding.common import (
    Generation,
    Model,
    CanvasCallback,
    StepCallback,
    check_length,
    check_positive,
    check_stop_ids,
    check_prompts,
    check_special_id,
    check_unit_interval,
    fill_undecided,
    forward_rows,
    gumbel_max_logits,
    model_device,
    num_transfer_tokens,
    pad_token_id,
    row_generator,
    settled_stop,
    shift_right,
    stop_token_ids,
    token_probability,
)
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec

Remasking = Literal["low_confidence", "random"]
REMASKINGS: tuple[str, ...] = ("low_confidence", "random")


@dataclass(frozen=True, kw_only=True)
class LLaDAConfig:
    gen_length: int = 128
    """Tokens to generate."""
    steps: int | None = None
    """Denoising steps over all blocks; must split evenly across blocks. Unused by threshold / factor.
    None means gen_length: one token per step."""
    block_length: int | None = None
    """Semi-autoregressive block; gen_length must be a multiple of it. None means gen_length."""
    temperature: float = 0.0
    """0 takes the arg-max; above 0 samples through float64 Gumbel noise."""
    cfg_scale: float = 0.0
    """Classifier-free guidance: logits_u + (cfg_scale + 1) (logits_c - logits_u), the unconditional
    pass seeing the prompt replaced by masks. Each guided step costs 2 NFE."""
    remasking: Remasking = "low_confidence"
    logits_eos_inf: bool = False
    """Forbid EOS by setting its logit to -inf before sampling."""
    confidence_eos_eot_inf: bool = False
    """LLaDA's flag as the official code behaves, not as it is named: the end-of-turn token always gets
    confidence 0 (and the softmax is taken without it); EOS gets the same treatment only at
    temperature 0, where the official noisy logits are the logits themselves."""
    threshold: float | None = None
    """Fast-dLLM v1 threshold rule (commit confidence >= threshold, always the top-1); None = off."""
    factor: float | None = None
    """Fast-dLLM v1 factor rule; None = off. Excludes `threshold`."""
    strategy: Any = None
    """A decoding strategy (`dlmc.strategies`): a StrategyConfig, a name, or {"name": ..., **options}.
    None = the rule the fields above choose (the LLaDA schedule, threshold or factor), run as the official
    code. Excludes `threshold` and `factor`."""
    stop_at_eos: bool = False
    """Stop a row at the end of a block once its first EOS / end-of-turn (`stop_token_ids` of the spec)
    and every position before it are decided; what it never decided holds `fill_token_id`. The tokens
    up to that stop are the full decode's. Off (the default) runs every step, as the official sampler."""

    def __post_init__(self) -> None:
        for name in ("steps", "block_length"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.gen_length)
        for name in ("gen_length", "steps", "block_length"):
            check_positive(name, getattr(self, name))
        if self.block_length > self.gen_length:
            raise DlmcError(f"block_length={self.block_length} is larger than gen_length={self.gen_length}")
        if self.gen_length % self.block_length:
            raise DlmcError(f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}")
        if self.steps % self.num_blocks:
            raise DlmcError(f"steps={self.steps} is not divisible by the number of blocks ({self.num_blocks})")
        if self.temperature < 0:
            raise DlmcError(f"temperature={self.temperature} must be >= 0")
        if self.cfg_scale < 0:
            raise DlmcError(f"cfg_scale={self.cfg_scale} must be >= 0")
        if self.remasking not in REMASKINGS:
            raise DlmcError(f"remasking={self.remasking!r} is not one of {', '.join(REMASKINGS)}")
        if self.threshold is not None and self.factor is not None:
            raise DlmcError("threshold and factor are exclusive; set one of them")
        if self.threshold is not None:
            check_unit_interval("threshold", self.threshold)
        if self.factor is not None and self.factor <= 0:
            raise DlmcError(f"factor={self.factor} must be > 0")
        if self.strategy is not None:
            object.__setattr__(self, "strategy", strategies.strategy_config(self.strategy))
            if self.threshold is not None or self.factor is not None:
                raise DlmcError("strategy: excludes threshold and factor (give them as the strategy's options)")
            rule = self.strategy.rule
            if self.remasking == "random" and not rule.random_remasking:
                raise DlmcError(f"remasking='random': the {self.strategy.name} strategy ranks by confidence")
            if self.temperature > 0 and rule.greedy:
                raise DlmcError(f"temperature={self.temperature}: the {self.strategy.name} strategy decodes at "
                                "temperature 0 only")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def parallel(self) -> bool:
        """True when a rule, not LLaDA's schedule, decides how many tokens each step commits."""
        if self.strategy is not None:
            return not self.strategy.rule.scheduled
        return self.threshold is not None or self.factor is not None


@dataclass(eq=False)
class _Row:
    """One prompt's decoding state."""

    x: torch.Tensor
    """[P + G] int64 canvas: prompt, then generated tokens or masks."""
    prompt_len: int
    generator: torch.Generator
    block: int = 0
    step: int = 0
    """Steps taken inside the current block."""
    done: bool = False
    nfe: int = 0
    index: int = 0
    """The row's place in the batch (a strategy's per-row state)."""
    steps_taken: int = 0


def validate(spec: DenoiserSpec, prompts: Sequence[Sequence[int]], config: LLaDAConfig) -> None:
    """Checks that need the model's spec or the prompts; the config checks itself on construction."""
    check_prompts(spec, prompts)
    longest = max(len(p) for p in prompts)
    check_length(spec, longest + config.gen_length, f"prompt {longest} + gen_length {config.gen_length}")
    if config.logits_eos_inf:
        check_special_id(spec, "eos_token_id", "logits_eos_inf")
    if config.confidence_eos_eot_inf:
        check_special_id(spec, "eos_token_id", "confidence_eos_eot_inf")
        check_special_id(spec, "eot_token_id", "confidence_eos_eot_inf")
    if config.stop_at_eos:
        check_stop_ids(spec, "stop_at_eos")


@torch.no_grad()
def generate(
    model: Model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: LLaDAConfig,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
    on_canvas: CanvasCallback | None = None,
) -> Generation:
    validate(spec, prompts, config)
    device = model_device(model)
    rows = [_new_row(prompt, spec, config, seed, device) for prompt in prompts]
    for index, row in enumerate(rows):
        row.index = index
    rule = None if config.strategy is None else config.strategy.build(config)
    pad_id = pad_token_id(spec)
    stop_ids = stop_token_ids(spec, None) if config.stop_at_eos else ()
    nfe = 0
    while active := [row for row in rows if not row.done]:
        logits = _denoiser_logits(model, spec, config, active, pad_id)
        cost = 2 if config.cfg_scale > 0 else 1
        nfe += cost
        for row, row_logits in zip(active, logits, strict=True):
            row.nfe += cost
            if rule is None:  # the official rules, as the official code runs them
                _denoise_step(row, row_logits, spec, config, stop_ids)
            else:
                _strategy_step(row, row_logits, spec, config, stop_ids, rule)
        if on_step is not None:
            on_step(nfe, sum(int((row.x[row.prompt_len :] != spec.mask_token_id).sum()) for row in rows))
        if on_canvas is not None:  # every row generates the same length, so the regions stack
            on_canvas(torch.stack([row.x[row.prompt_len :] for row in rows]))  # [B, G]
    outputs = [fill_undecided(row.x[row.prompt_len :], spec) for row in rows]
    return Generation(output_ids=outputs, nfe=nfe, row_nfe=[row.nfe for row in rows])


def _new_row(prompt: list[int], spec: DenoiserSpec, config: LLaDAConfig, seed: int, device: torch.device) -> _Row:
    masks = [spec.mask_token_id] * config.gen_length
    x = torch.tensor(prompt + masks, dtype=torch.long, device=device)  # [P + G] int64
    return _Row(x=x, prompt_len=len(prompt), generator=row_generator(seed, device))


def _denoiser_logits(
    model: Model, spec: DenoiserSpec, config: LLaDAConfig, rows: list[_Row], pad_id: int
) -> list[torch.Tensor]:
    """Each row's logits [P + G, V], aligned so row i predicts position i, guided when cfg_scale > 0."""
    canvases = [row.x for row in rows]
    sequences = [id(row) for row in rows]  # stable per-row names; a K/V cache keeps a store per name
    if config.cfg_scale > 0:
        # the unconditional pass masks the prompt rather than dropping it, so positions stay put
        unconditional = [row.x.clone().index_fill_(0, _prompt_index(row), spec.mask_token_id) for row in rows]
        canvases = canvases + unconditional
        sequences = sequences + [(id(row), "unconditional") for row in rows]
    logits = forward_rows(model, canvases, pad_id, sequences=sequences)
    if spec.shift_logits:
        logits = [shift_right(row_logits) for row_logits in logits]
    if config.cfg_scale == 0:
        return logits
    conditional, unconditional = logits[: len(rows)], logits[len(rows) :]
    return [u + (config.cfg_scale + 1) * (c - u) for c, u in zip(conditional, unconditional, strict=True)]


def _prompt_index(row: _Row) -> torch.Tensor:
    return torch.arange(row.prompt_len, device=row.x.device)  # [P] int64


def _denoise_step(
    row: _Row, logits: torch.Tensor, spec: DenoiserSpec, config: LLaDAConfig, stop_ids: tuple[int, ...]
) -> None:
    """Pick a token for every position, commit the chosen masked ones of the current block, move on."""
    if config.logits_eos_inf:
        logits = logits.index_fill(-1, _ids(logits, spec.eos_token_id), float("-inf"))  # [L, V]
    noisy = gumbel_max_logits(logits, config.temperature, row.generator)  # [L, V]
    x0 = noisy.argmax(dim=-1)  # [L] int64
    confidence = _confidence(logits, x0, row, spec, config)  # [L]
    block_end = row.prompt_len + (row.block + 1) * config.block_length
    eligible = row.x == spec.mask_token_id  # [L] bool
    eligible[block_end:] = False
    confidence = torch.where(eligible, confidence, float("-inf"))  # [L]
    chosen = _choose(confidence, eligible, row, config)  # [K] int64 positions
    row.x[chosen] = x0[chosen]
    _advance(row, block_end, spec, config, stop_ids)


def _confidence(
    logits: torch.Tensor, x0: torch.Tensor, row: _Row, spec: DenoiserSpec, config: LLaDAConfig
) -> torch.Tensor:
    """Score of every position's chosen token; higher is committed first. [L]"""
    if config.remasking == "random":
        return torch.rand(x0.shape, generator=row.generator, device=x0.device)  # [L] float32
    if config.confidence_eos_eot_inf:
        banned = [spec.eot_token_id]
        if config.temperature == 0:
            # the official code writes EOS into the noisy logits, which at T = 0 are the logits
            banned.append(spec.eos_token_id)
        logits = logits.index_fill(-1, _ids(logits, *banned), float("-inf"))  # [L, V]
    score = "confidence64" if config.parallel else "confidence"
    if config.strategy is not None:
        score = config.strategy.rule.score
    dtype = torch.float64 if score == "confidence64" else logits.dtype
    return token_probability(logits, x0, dtype)  # [L]


def _strategy_step(
    row: _Row, logits: torch.Tensor, spec: DenoiserSpec, config: LLaDAConfig, stop_ids: tuple[int, ...], rule
) -> None:
    """`_denoise_step` with the commit chosen by a strategy: the rule sees the block's columns (or every
    generated column) as one row of [B, K] tensors, as the fused loop hands them."""
    if config.logits_eos_inf:
        logits = logits.index_fill(-1, _ids(logits, spec.eos_token_id), float("-inf"))  # [L, V]
    noisy = gumbel_max_logits(logits, config.temperature, row.generator)  # [L, V]
    x0 = noisy.argmax(dim=-1)  # [L] int64
    confidence = _confidence(logits, x0, row, spec, config)  # [L]
    block_start = row.prompt_len + row.block * config.block_length
    block_end = block_start + config.block_length
    lo, hi = (row.prompt_len, len(row.x)) if rule.sees_generation else (block_start, block_end)
    masked = row.x[lo:hi] == spec.mask_token_id  # [K] bool
    in_block = torch.zeros_like(masked)
    in_block[block_start - lo : block_end - lo] = True
    eligible = masked & in_block  # [K] bool
    scores = strategies.Scores(
        confidence=torch.where(eligible, confidence[lo:hi], float("-inf"))[None],  # [1, K]
        eligible=eligible[None],
        masked=masked[None],
        step=torch.tensor([row.step], device=row.x.device),
        total_step=torch.tensor([row.steps_taken], device=row.x.device),
        steps_per_block=torch.tensor([config.steps_per_block], device=row.x.device),
        steps=torch.tensor([config.steps], device=row.x.device),
    )
    if "entropy" in rule.outputs:
        scores.entropy = strategies.entropy(logits[lo:hi])[None]  # [1, K]
    if "margin" in rule.outputs:
        scores.margin = strategies.logit_margin(logits[lo:hi])[None]  # [1, K]
    if "top_probs" in rule.outputs:
        scores.top_probs = strategies.top_probs(logits[lo:hi])[None]  # [1, K, TOP]
    if "top_ids" in rule.outputs:
        scores.top_ids = strategies.top_ids(logits[lo:hi])[None]  # [1, K, TOP]
    scores.tokens = x0[lo:hi][None]  # [1, K]
    commit = rule.commit(scores, torch.tensor([row.index], device=row.x.device))[0] & masked  # [K]
    row.x[lo:hi] = torch.where(commit, scores.tokens[0], row.x[lo:hi])
    row.steps_taken += 1
    _advance(row, block_end, spec, config, stop_ids)
    if not bool((row.x[row.prompt_len :] == spec.mask_token_id).any()):  # an early commit filled everything
        row.done = True


def _ids(logits: torch.Tensor, *ids: int | None) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=logits.device)


def _choose(confidence: torch.Tensor, eligible: torch.Tensor, row: _Row, config: LLaDAConfig) -> torch.Tensor:
    if config.threshold is not None:
        return _threshold_choice(confidence, int(eligible.sum()), config.threshold)
    if config.factor is not None:
        return _factor_choice(confidence, eligible, config.factor)
    # every block starts with block_length masks, so every block gets the same schedule
    schedule = num_transfer_tokens(config.block_length, config.steps_per_block)
    return torch.topk(confidence, schedule[row.step]).indices  # [k]


def _threshold_choice(confidence: torch.Tensor, candidates: int, threshold: float) -> torch.Tensor:
    """Fast-dLLM v1: the most confident candidate, plus every other one with confidence >= threshold."""
    values, order = torch.topk(confidence, candidates)  # [n], [n], best first
    keep = ~(values < threshold)  # [n] bool
    keep[0] = True
    return order[keep]


def _factor_choice(confidence: torch.Tensor, eligible: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM v1 factor rule: the `factor_accept_count` most confident candidates."""
    ranked = torch.sort(confidence[eligible], descending=True).values  # [n]
    return torch.topk(confidence, factor_accept_count(ranked, factor)).indices


def factor_accept_count(ranked: torch.Tensor, factor: float) -> int:
    """How many of the confidences `ranked` (descending) the factor rule accepts.

    The j-th (1-based) must reach 1 - factor / (j + 1); the first is always accepted and the first
    failure ends the prefix. Reproduces the official off-by-one: a failure at the last candidate still
    accepts every candidate.
    """
    n = len(ranked)
    for i in range(1, n):
        if ranked[i] < 1 - factor / (i + 2):
            return n if i == n - 1 else i
    return n


def _advance(row: _Row, block_end: int, spec: DenoiserSpec, config: LLaDAConfig, stop_ids: tuple[int, ...]) -> None:
    """Count the step; at the end of a block move to the next, or stop (last block, or a settled stop
    token when `stop_ids` is set: only at a block's end, where everything before the next block is decided)."""
    row.step += 1
    if config.parallel:
        block_done = not bool((row.x[block_end - config.block_length : block_end] == spec.mask_token_id).any())
    else:
        block_done = row.step == config.steps_per_block
    if not block_done:
        return
    row.block += 1
    row.step = 0
    row.done = row.block == config.num_blocks or settled_stop(row.x[row.prompt_len :], stop_ids, spec.mask_token_id)
