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
        # num_transfer_tokens(block_length, steps_per_block)[step] for each row: every block starts with
        # block_length masks, split evenly over the row's steps per block, the remainder first
        bl, per_block = self.decode.block_length, scores.steps_per_block  # per_block: [B]
        per_step, remainder = bl // per_block, bl % per_block  # [B] each
        k = per_step + (scores.step < remainder).long()  # [B]: each row's count this step
        return top_k(scores.confidence, k)


def top_k(confidence: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """The k (an int, or [B] per row) most confident eligible columns. [B, K] -> [B, K] bool"""
    k = torch.as_tensor(k, device=confidence.device).reshape(-1, 1)  # [B, 1] or [1, 1]
    most = min(int(k.max()), confidence.shape[-1])
    chosen = torch.topk(confidence, most, dim=-1).indices  # [B, most], best first
    taken = torch.arange(most, device=confidence.device) < k  # [B, most]
    return torch.zeros_like(confidence, dtype=torch.bool).scatter_(-1, chosen, taken.expand_as(chosen))


@dataclass(frozen=True, kw_only=True)
class TopKConfig(StrategyConfig):
    name: str = dataclasses.field(default="top_k", init=False)
    rule = TopK
