"""FreeDave (arXiv 2510.00294): lossless draft-and-verify for one-token-per-step LLaDA decoding.

The reference is the llada decoder with one token per step (`steps == gen_length`), low-confidence
order at temperature 0: every step commits the most confident masked position of the current block.
FreeDave produces exactly its tokens with fewer model calls:

* from the logits of the current canvas x_n, draft the next `drafts` steps as the reference would take
  them if the logits stayed put: d_k is x_n advanced k reference steps, all with x_n's logits. d_1 is
  x_{n+1} by construction (it is the reference's own step);
* one model call runs every draft; advancing d_k one reference step with its own logits gives t_k;
* d_1 is exact, and if d_k is exact then t_k is x_{n+k+1}, so d_{k+1} is exact when it equals t_k:
  accept the longest such chain d_1 .. d_j, keep d_j's logits and repeat from there.

A round costs one model call (over up to `drafts` canvases per row) and advances at least one step,
so the count of calls never exceeds the reference's. Each row drafts and verifies on its own; rows
share the calls. A draft that finishes the row (last block full, or a settled stop with stop_at_eos)
needs no logits and is not run. The reference's decisions are made by the same code
(`llada._denoise_step`), so ties break the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.decoding import llada
from dlmc.decoding.common import (
    Generation,
    Model,
    StepCallback,
    check_positive,
    fill_undecided,
    forward_rows,
    model_device,
    pad_token_id,
    shift_right,
    stop_token_ids,
)
from dlmc.spec import DenoiserSpec


@dataclass(frozen=True, kw_only=True)
class FreeDaveConfig:
    gen_length: int = 128
    block_length: int | None = None
    """Semi-autoregressive block of the static decoder; None means gen_length."""
    drafts: int = 4
    """Future steps drafted per round; one model call runs all of them (`drafts` canvases per row)."""
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    stop_at_eos: bool = False
    """As the llada decoder's options of the same names."""

    def __post_init__(self) -> None:
        check_positive("drafts", self.drafts)
        self.static()  # the static decoder's checks: lengths, blocks

    def static(self) -> llada.LLaDAConfig:
        """The llada config whose tokens this decoder reproduces: one token per step, temperature 0."""
        return llada.LLaDAConfig(
            gen_length=self.gen_length, steps=self.gen_length, block_length=self.block_length,
            logits_eos_inf=self.logits_eos_inf, confidence_eos_eot_inf=self.confidence_eos_eot_inf,
            stop_at_eos=self.stop_at_eos,
        )


@dataclass(eq=False)
class _Verified:
    """A row at a canvas the static decoder reaches, with that canvas's logits once computed."""

    row: llada._Row
    logits: torch.Tensor | None = None  # [P + G, V], aligned so row i predicts position i


@torch.no_grad()
def generate(
    model: Model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: FreeDaveConfig,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> Generation:
    static = config.static()
    llada.validate(spec, prompts, static)
    device = model_device(model)
    states = [_Verified(llada._new_row(prompt, spec, static, seed, device)) for prompt in prompts]
    pad_id = pad_token_id(spec)
    stop_ids = stop_token_ids(spec, None) if config.stop_at_eos else ()

    def step(row: llada._Row, logits: torch.Tensor) -> llada._Row:
        """The static decoder's next state from `row` with `logits`, `row` untouched."""
        after = dataclasses.replace(row, x=row.x.clone())
        llada._denoise_step(after, logits, spec, static, stop_ids)
        return after

    nfe = 0
    while active := [s for s in states if not s.row.done]:
        # rows without logits (the first round) run their canvas; the others their drafts
        plans = [[s.row] if s.logits is None else _drafts(s, config.drafts, step) for s in active]
        canvases = [d for plan in plans for d in plan if not d.done]
        logits = iter(_logits(model, spec, canvases, pad_id) if canvases else [])
        if canvases:
            nfe += 1
        for state, plan in zip(active, plans, strict=True):
            own = [None if d.done else next(logits) for d in plan]
            if any(x is not None for x in own):
                state.row.nfe += 1
            nfe_row = state.row.nfe
            if state.logits is None:
                state.logits = own[0]
                continue
            best = _accepted(plan, own, step)
            state.row, state.logits = plan[best], own[best]
            state.row.nfe = nfe_row
        if on_step is not None:
            on_step(nfe, sum(int((s.row.x[s.row.prompt_len :] != spec.mask_token_id).sum()) for s in states))
    outputs = [fill_undecided(s.row.x[s.row.prompt_len :], spec) for s in states]
    return Generation(output_ids=outputs, nfe=nfe, row_nfe=[s.row.nfe for s in states])


def _drafts(state: _Verified, count: int, step) -> list[llada._Row]:
    """d_1 .. d_count: the row advanced 1 .. count static steps with its current logits (fewer when
    the row finishes on the way)."""
    drafts, row = [], state.row
    while len(drafts) < count and not row.done:
        row = step(row, state.logits)
        drafts.append(row)
    return drafts


def _accepted(drafts: list[llada._Row], logits: list[torch.Tensor | None], step) -> int:
    """Index of the last draft of the verified chain: d_1 always; d_{k+1} when it equals d_k advanced
    one static step with d_k's own logits."""
    best = 0
    while best + 1 < len(drafts) and logits[best] is not None:
        target = step(drafts[best], logits[best])
        following = drafts[best + 1]
        same_state = (target.block, target.step, target.done) == (following.block, following.step, following.done)
        if not (same_state and torch.equal(target.x, following.x)):
            break
        best += 1
    return best


def _logits(model: Model, spec: DenoiserSpec, rows: list[llada._Row], pad_id: int) -> list[torch.Tensor]:
    """One plain model call over every canvas (no K/V cache: drafts are throw-away sequences)."""
    logits = forward_rows(model, [row.x for row in rows], pad_id)  # each [P + G, V]
    return [shift_right(row_logits) for row_logits in logits] if spec.shift_logits else logits
