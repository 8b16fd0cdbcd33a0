"""Fast-dLLM v1's threshold rule: every eligible position whose confidence reaches the threshold, and
always the most confident one (NVlabs/Fast-dLLM `get_transfer_index` with `threshold`). Ranks the
float64 probability, as the official code; the block repeats until it is full."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.decoding.common import check_unit_interval
from dlmc.strategies.base import Scores, Strategy, StrategyConfig, best


class Threshold(Strategy):
    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        return above_threshold(scores.confidence, self.config.threshold)


def above_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, K] -> [B, K] bool. -inf (not eligible) never passes a threshold in (0, 1]."""
    return (confidence >= threshold) | best(confidence)


@dataclass(frozen=True, kw_only=True)
class ThresholdConfig(StrategyConfig):
    name: str = dataclasses.field(default="threshold", init=False)
    rule = Threshold
    threshold: float = 0.9
    """Commit every eligible position with confidence >= threshold (and always the best)."""

    def __post_init__(self) -> None:
        check_unit_interval("threshold", self.threshold)
