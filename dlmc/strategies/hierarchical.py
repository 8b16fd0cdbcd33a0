"""dInfer's hierarchical rule (`get_transfer_index_hierarchy_fast_v2`, `HierarchyDecoder`): split the
block's masked positions into contiguous runs; commit the most confident position of each run whose
confidence exceeds `low_threshold`, every position above `threshold`, and always the block's most
confident one. The block repeats until it is full. dInfer asserts batch 1; this works per row on [B, K]."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError
from dlmc.strategies.base import Scores, Strategy, StrategyConfig, best, check_probability


class Hierarchical(Strategy):
    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        c = self.config
        conf = scores.confidence  # [B, K]
        per_run = run_best(conf, scores.eligible) & (conf > c.low_threshold)
        return per_run | (conf > c.threshold) | best(conf)


def run_best(confidence: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """The first most confident position of every contiguous run of eligible columns.
    confidence, eligible [B, K] -> [B, K] bool"""
    B, K = confidence.shape
    previous = torch.cat([torch.zeros_like(eligible[:, :1]), eligible[:, :-1]], dim=-1)  # [B, K]
    run = (eligible & ~previous).long().cumsum(-1) * eligible  # [B, K]: 1.. inside runs, 0 outside
    low = torch.full((B, K + 1), float("-inf"), dtype=confidence.dtype, device=confidence.device)
    top = low.scatter_reduce(-1, run, confidence, "amax")  # [B, K + 1]: each run's best confidence
    at_top = eligible & (confidence == top.gather(-1, run))  # [B, K]
    j = torch.arange(K, device=confidence.device).expand(B, K)  # [B, K]
    none = torch.full((B, K + 1), K, dtype=torch.long, device=confidence.device)
    first = none.scatter_reduce(-1, run, torch.where(at_top, j, K), "amin")  # [B, K + 1]: first best per run
    return eligible & (j == first.gather(-1, run))


@dataclass(frozen=True, kw_only=True)
class HierarchicalConfig(StrategyConfig):
    name: str = dataclasses.field(default="hierarchical", init=False)
    rule = Hierarchical
    threshold: float = 0.92
    """Commit every position above it (dInfer's guide: 0.92)."""
    low_threshold: float = 0.62
    """Commit each masked run's best above it (dInfer's guide: 0.62)."""

    def __post_init__(self) -> None:
        check_probability("threshold", self.threshold)
        check_probability("low_threshold", self.low_threshold)
        if self.low_threshold > self.threshold:
            raise DlmcError(f"low_threshold={self.low_threshold} must not exceed threshold={self.threshold}")
