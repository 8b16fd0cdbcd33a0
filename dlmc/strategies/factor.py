"""Fast-dLLM v1's factor rule (`get_transfer_index_dynamic`): the longest confidence-sorted prefix
whose j-th (1-based) entry reaches 1 - factor / (j + 1), the first always. Like the official code (and
`dlmc.decoding.llada.factor_accept_count`) a failure at the last candidate accepts all of them.
Ranks the float64 probability; the block repeats until it is full."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError
from dlmc.strategies.base import Scores, Strategy, StrategyConfig


class Factor(Strategy):
    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        return factor_prefix(scores.confidence, self.config.factor)


def factor_prefix(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """[B, K] -> [B, K] bool"""
    ranked, order = torch.sort(confidence, dim=-1, descending=True)  # [B, K] each
    K = confidence.shape[-1]
    j = torch.arange(K, device=confidence.device)  # [K]: 0-based rank
    candidates = (confidence > float("-inf")).sum(-1, keepdim=True)  # [B, 1]
    fails = (ranked < 1 - factor / (j + 2)) & (j >= 1) & (j < candidates)  # [B, K]
    first = torch.where(fails, j, K).amin(-1, keepdim=True)  # [B, 1]: K when nothing fails
    count = torch.where((first == K) | (first == candidates - 1), candidates, first)  # [B, 1]
    accepted = j < count  # [B, K] in sorted order
    return torch.zeros_like(accepted).scatter_(-1, order, accepted)


@dataclass(frozen=True, kw_only=True)
class FactorConfig(StrategyConfig):
    name: str = dataclasses.field(default="factor", init=False)
    rule = Factor
    factor: float = 1.0
    """The j-th most confident position needs confidence >= 1 - factor / (j + 1)."""

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise DlmcError(f"factor={self.factor} must be > 0")
