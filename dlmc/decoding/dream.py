"""Dream's `diffusion_generate` sampler (DreamGenerationMixin._sample), plus Fast-dLLM's threshold alg.

The canvas is [prompt | max_new_tokens masks]; every step runs the model over all of it (logits
shifted per the spec, so row i predicts position i) and updates the masked positions:

* "origin": each masked position flips independently with probability 1 - s/t (1 at the last step)
  on the timesteps linspace(1, eps, steps + 1), taking a token sampled from the filtered softmax;
* "maskgit_plus" / "topk_margin" / "entropy": a token for every masked position, scored by its
  probability / top1 - top2 margin / negative entropy; int(n_masked * (1 - s/t)) of them are
  committed (all remaining at the last step), the best first, or drawn from softmax(score / alg_temp);
* "confidence_threshold" (Fast-dLLM): max_new_tokens / steps tokens per step, the best always, the
  others only if their probability reaches `threshold`; an unused quota carries to the next step and
  the last step repeats until every position is filled.

Filtering (temperature, then top-p, then top-k) happens before the scores are taken; with
temperature > 0 the token is sampled and its probability is its score. Softmax runs in the model's
logits dtype, as in the official file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dlmc.decoding.common import (
    Generation,
    Model,
    CanvasCallback,
    StepCallback,
    check_length,
    check_positive,
    check_prompts,
    check_stop_ids,
    check_sampling,
    check_unit_interval,
    fill_undecided,
    forward_rows,
    model_device,
    pad_token_id,
    row_generator,
    sample_categorical,
    settled_stop,
    shift_right,
    stop_token_ids,
    top_k_filter,
    top_p_filter,
)
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec

Alg = Literal["origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold"]
ALGS: tuple[str, ...] = ("origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold")
_RANKED_ALGS = ("maskgit_plus", "topk_margin", "entropy")


@dataclass(frozen=True, kw_only=True)
class DreamConfig:
    max_new_tokens: int = 512
    steps: int = 512
    eps: float = 1e-3
    """Final timestep of linspace(1, eps, steps + 1)."""
    alg: Alg = "origin"
    alg_temp: float | None = None
    """Ranked algs only: None or 0 commits the best scores; above 0 draws positions from
    softmax(score / alg_temp) without replacement."""
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    threshold: float = 0.9
    """alg="confidence_threshold" only."""
    stop_at_eos: bool = False
    """Stop a row after the step that leaves its first EOS / end-of-turn (`stop_token_ids` of the spec)
    and every position before it decided; what it never decided holds `fill_token_id`. The tokens up to
    that stop are the full decode's. Off (the default) runs every step, as the official sampler."""

    def __post_init__(self) -> None:
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("steps", self.steps)
        if not 0 < self.eps < 1:
            raise DlmcError(f"eps={self.eps} must lie in (0, 1)")
        if self.alg not in ALGS:
            raise DlmcError(f"alg={self.alg!r} is not one of {', '.join(ALGS)}")
        if self.alg_temp is not None and self.alg_temp < 0:
            raise DlmcError(f"alg_temp={self.alg_temp} must be >= 0 (or None)")
        check_sampling(self.temperature, self.top_k, self.top_p)
        check_unit_interval("threshold", self.threshold)
        if self.alg == "confidence_threshold" and self.max_new_tokens % self.steps:
            raise DlmcError(
                f"max_new_tokens={self.max_new_tokens} is not divisible by steps={self.steps}"
                " (alg='confidence_threshold' commits the same quota each step)"
            )


@dataclass(eq=False)
class _Row:
    """One prompt's decoding state."""

    x: torch.Tensor
    """[P + G] int64 canvas: prompt, then generated tokens or masks."""
    prompt_len: int
    generator: torch.Generator
    steps: int
    """Steps this row runs; confidence_threshold adds one whenever its last step leaves masks."""
    quota: int
    """confidence_threshold: tokens per step (0 once the planned steps are used up)."""
    step: int = 0
    carry: int = 0
    """confidence_threshold: quota earlier steps left unused."""
    stopped: bool = False
    """stop_at_eos: a settled stop token ended the row before its last step."""

    @property
    def done(self) -> bool:
        return self.stopped or self.step >= self.steps


def validate(spec: DenoiserSpec, prompts: Sequence[Sequence[int]], config: DreamConfig) -> None:
    """Checks that need the model's spec or the prompts; the config checks itself on construction."""
    check_prompts(spec, prompts)
    longest = max(len(p) for p in prompts)
    check_length(spec, longest + config.max_new_tokens, f"prompt {longest} + max_new_tokens {config.max_new_tokens}")
    if config.stop_at_eos:
        check_stop_ids(spec, "stop_at_eos")


@torch.no_grad()
def generate(
    model: Model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: DreamConfig,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
    on_canvas: CanvasCallback | None = None,
) -> Generation:
    validate(spec, prompts, config)
    device = model_device(model)
    rows = [_new_row(prompt, spec, config, seed, device) for prompt in prompts]
    timesteps = torch.linspace(1, config.eps, config.steps + 1, device=device)  # [steps + 1] float32
    pad_id = pad_token_id(spec)
    stop_ids = stop_token_ids(spec, None) if config.stop_at_eos else ()
    nfe = 0
    while active := [row for row in rows if not row.done]:
        logits = forward_rows(model, [row.x for row in active], pad_id, sequences=[id(row) for row in active])
        nfe += 1
        for row, row_logits in zip(active, logits, strict=True):
            aligned = shift_right(row_logits) if spec.shift_logits else row_logits  # [P + G, V]
            _denoise_step(row, aligned, timesteps, spec, config)
            # checked every step: Dream has no blocks, and a stop may settle at any step
            row.stopped = settled_stop(row.x[row.prompt_len :], stop_ids, spec.mask_token_id)
        if on_step is not None:
            on_step(nfe, sum(int((row.x[row.prompt_len :] != spec.mask_token_id).sum()) for row in rows))
        if on_canvas is not None:  # every row generates the same length, so the regions stack
            on_canvas(torch.stack([row.x[row.prompt_len :] for row in rows]))  # [B, G]
    outputs = [fill_undecided(row.x[row.prompt_len :], spec) for row in rows]
    return Generation(output_ids=outputs, nfe=nfe, row_nfe=[row.step for row in rows])


def _new_row(prompt: list[int], spec: DenoiserSpec, config: DreamConfig, seed: int, device: torch.device) -> _Row:
    x = torch.tensor(prompt + [spec.mask_token_id] * config.max_new_tokens, dtype=torch.long, device=device)
    return _Row(
        x=x,  # [P + G] int64
        prompt_len=len(prompt),
        generator=row_generator(seed, device),
        steps=config.steps,
        quota=config.max_new_tokens // config.steps,
    )


def _denoise_step(
    row: _Row, logits: torch.Tensor, timesteps: torch.Tensor, spec: DenoiserSpec, config: DreamConfig
) -> None:
    masked = row.x == spec.mask_token_id  # [L] bool
    mask_logits = logits[masked]  # [M, V]
    if config.alg == "origin":
        _origin_update(row, masked, mask_logits, timesteps, spec, config)
    elif config.alg == "confidence_threshold":
        _threshold_update(row, masked, mask_logits, logits.dtype, config)
    else:
        _ranked_update(row, masked, mask_logits, logits.dtype, timesteps, config)
    row.step += 1


def _is_last_step(row: _Row) -> bool:
    return row.step == row.steps - 1


def _origin_update(
    row: _Row,
    masked: torch.Tensor,
    mask_logits: torch.Tensor,
    timesteps: torch.Tensor,
    spec: DenoiserSpec,
    config: DreamConfig,
) -> None:
    """Ancestral MDM step: each mask flips with probability 1 - s/t, independently."""
    t, s = timesteps[row.step], timesteps[row.step + 1]
    flip_probability = 1 if _is_last_step(row) else 1 - s / t
    x0 = torch.full((len(mask_logits),), spec.mask_token_id, dtype=torch.long, device=row.x.device)  # [M]
    flips = torch.rand(x0.shape, generator=row.generator, device=x0.device) < flip_probability  # [M] bool
    if flips.any():
        _, x0[flips] = _sample_tokens(mask_logits[flips], config, row.generator)
    row.x[masked] = x0


def _ranked_update(
    row: _Row,
    masked: torch.Tensor,
    mask_logits: torch.Tensor,
    dtype: torch.dtype,
    timesteps: torch.Tensor,
    config: DreamConfig,
) -> None:
    """Commit the best-scored masked positions; how many follows the timestep schedule.

    The count uses this row's mask count; the official code uses the batch mean, which differs only
    for rows with different mask counts (here every row has max_new_tokens masks, so never).
    """
    score, x0 = _sample_tokens(mask_logits, config, row.generator, metric=config.alg)  # [M], [M]
    mask_count = int(masked.sum())
    if _is_last_step(row):
        count = mask_count
    else:
        t, s = timesteps[row.step], timesteps[row.step + 1]
        # the official int(mean_mask_count * (1 - s / t)), in the same (default float) dtype
        count = int(masked.sum().to(t.dtype) * (1 - s / t))
    if count == 0:
        return
    full_score = _scatter_scores(score, masked, dtype)  # [L]
    if config.alg_temp:
        weights = torch.softmax(full_score / config.alg_temp, dim=-1)  # [L]
        chosen = torch.multinomial(weights, count, generator=row.generator)  # [count]
    else:
        chosen = torch.topk(full_score, count).indices  # [count]
    _commit(row, masked, x0, chosen)


def _threshold_update(
    row: _Row, masked: torch.Tensor, mask_logits: torch.Tensor, dtype: torch.dtype, config: DreamConfig
) -> None:
    """Fast-dLLM's confidence_threshold step (Dream sampler without cache)."""
    confidence, x0 = _sample_tokens(mask_logits, config, row.generator)  # [M], [M]
    full_confidence = _scatter_scores(confidence, masked, dtype)  # [L]
    count = row.quota + row.carry
    values, order = torch.topk(full_confidence, count)  # [count], [count], best first
    below = values[1:] < config.threshold  # [count - 1] bool; the best is always committed
    row.carry = int(below.sum())
    if row.carry and _is_last_step(row):
        # the planned steps are used up: keep stepping, one extra step at a time, on the carry alone
        row.quota = 0
        row.steps += 1
    keep = torch.cat([below.new_ones(1), ~below])  # [count] bool
    _commit(row, masked, x0, order[keep])


def _scatter_scores(score: torch.Tensor, masked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    full = torch.full(masked.shape, float("-inf"), dtype=dtype, device=score.device)  # [L]
    full[masked] = score.to(dtype)
    return full


def _commit(row: _Row, masked: torch.Tensor, x0: torch.Tensor, chosen: torch.Tensor) -> None:
    candidates = row.x.clone()  # [L] int64
    candidates[masked] = x0
    row.x[chosen] = candidates[chosen]


def _sample_tokens(
    logits: torch.Tensor, config: DreamConfig, generator: torch.Generator, metric: str = "maskgit_plus"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A token and a score for every row of logits [N, V]: (score [N], token [N])."""
    if config.temperature > 0:
        logits = logits / config.temperature
    fill = torch.finfo(logits.dtype).min
    if config.top_p is not None and config.top_p < 1:
        logits = top_p_filter(logits, config.top_p, fill)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k, fill)
    probs = torch.softmax(logits, dim=-1)  # [N, V]
    if config.temperature > 0:
        tokens = sample_categorical(probs, generator)  # [N]
        score = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N]
    else:
        score, tokens = probs.max(dim=-1)  # [N], [N]
    if metric == "topk_margin":
        top2 = torch.topk(probs, 2).values  # [N, 2]
        score = top2[:, 0] - top2[:, 1]
    elif metric == "entropy":
        score = (probs * torch.log(probs + 1e-10)).sum(dim=-1)  # [N] negative entropy
    return score, tokens
