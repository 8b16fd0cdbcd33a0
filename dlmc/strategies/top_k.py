"""LLaDA's schedule (ML-GSAI/LLaDA `generate`): `steps / num_blocks` steps per block, the i-th committing
`num_transfer_tokens(block_length, steps_per_block)[i]` positions, the most confident first (ranked in
the logits dtype, as the official code) or in random order (remasking='random')."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.strategies.base import Scores, Strategy, StrategyConfig


class TopK(Strategy):
    score = "confidence"
    scheduled = True
    random_remasking = True

    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        return top_k(scores.confidence, *schedule_count(scores, self.decode.block_length))


def schedule_count(scores: Scores, block_length: int) -> tuple[torch.Tensor, int | None]:
    """Each row's count this step [B], and the largest of them from the caller's host copy of the
    schedule where it keeps one (else None: `top_k` reads it back from the device)."""
    k = transfer_count(block_length, scores.step, scores.steps_per_block)  # [B]
    if scores.host_step is None:
        return k, None
    steps = zip(scores.host_step, scores.host_steps_per_block, strict=True)
    return k, max(transfer_count(block_length, step, per_block) for step, per_block in steps)


def transfer_count(block_length: int, step, steps_per_block):
    """num_transfer_tokens(block_length, steps_per_block)[step]: every block starts with block_length
    masks, split evenly over its steps, the remainder first. On ints, or on [B] tensors (-> [B] int64)."""
    return block_length // steps_per_block + (step < block_length % steps_per_block)


def top_k(confidence: torch.Tensor, k: torch.Tensor | int, most: int | None = None) -> torch.Tensor:
    """The k (an int, or [B] per row) most confident eligible columns. [B, K] -> [B, K] bool

    `most`: the largest k, if the caller knows it on the host (else it is read back: a host sync)."""
    k = torch.as_tensor(k, device=confidence.device).reshape(-1, 1)  # [B, 1] or [1, 1]
    most = min(int(k.max()) if most is None else most, confidence.shape[-1])
    chosen = torch.topk(confidence, most, dim=-1).indices  # [B, most], best first
    taken = torch.arange(most, device=confidence.device) < k  # [B, most]
    return torch.zeros_like(confidence, dtype=torch.bool).scatter_(-1, chosen, taken.expand_as(chosen))


@dataclass(frozen=True, kw_only=True)
class TopKConfig(StrategyConfig):
    name: str = dataclasses.field(default="top_k", init=False)
    rule = TopK
