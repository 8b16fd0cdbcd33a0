"""LocalLeap (arXiv 2510.07081; parameters as dlmserve's `sampler.py`): anchors are the block's masked
positions with confidence >= `threshold`; commit them and every masked position within `radius` columns
of an anchor whose confidence is >= `low_threshold`. Without an anchor, the single most confident
position. The block repeats until it is full."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError
from dlmc.strategies.base import Scores, Strategy, StrategyConfig, best, check_probability


class LocalLeap(Strategy):
    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        c = self.config
        conf = scores.confidence  # [B, K]
        anchors = conf >= c.threshold  # [B, K]; -inf (not eligible) is never an anchor
        near = near_any(anchors, c.radius)  # [B, K]
        return anchors | (near & (conf >= c.low_threshold)) | best(conf)


def near_any(marks: torch.Tensor, radius: int) -> torch.Tensor:
    """Columns within `radius` of a marked column. [B, K] bool -> [B, K] bool"""
    window = torch.nn.functional.max_pool1d(marks[:, None].float(), 2 * radius + 1, stride=1, padding=radius)
    return window[:, 0] > 0


@dataclass(frozen=True, kw_only=True)
class LocalLeapConfig(StrategyConfig):
    name: str = dataclasses.field(default="local_leap", init=False)
    rule = LocalLeap
    threshold: float = 0.9
    """Anchor confidence."""
    low_threshold: float = 0.75
    """Confidence a neighbour of an anchor needs."""
    radius: int = 4
    """How many columns either side of an anchor count as its neighbourhood."""

    def __post_init__(self) -> None:
        check_probability("threshold", self.threshold)
        check_probability("low_threshold", self.low_threshold)
        if self.low_threshold > self.threshold:
            raise DlmcError(f"low_threshold={self.low_threshold} must not exceed threshold={self.threshold}")
        if not isinstance(self.radius, int) or self.radius < 0:
            raise DlmcError(f"radius={self.radius} must be an integer >= 0")
