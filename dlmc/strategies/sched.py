"""SchED (arXiv 2512.02892, paper only: no published code): LLaDA's schedule, and once the mean top-1
minus top-2 logit gap over the whole generated span reaches tau(p), commit every remaining mask at once.
p is the progress (steps taken / `steps`); tau falls smoothly from `high` at p = 0 to `low` at p = 1,
linearly or along a half cosine. The paper's defaults were not published; these are Prophet's range."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from dlmc.errors import DlmcError
from dlmc.strategies.base import Scores, StrategyConfig
from dlmc.strategies.early_commit import EarlyCommit, mean_over

SHAPES = ("linear", "cosine")


class SchED(EarlyCommit):
    def converged(self, scores: Scores) -> torch.Tensor:
        everywhere = torch.ones_like(scores.masked)  # [B, K]: the whole answer region, decided or not
        gap = mean_over(scores.margin, everywhere)  # [B]
        return gap >= self.config.tau(self.progress(scores))


@dataclass(frozen=True, kw_only=True)
class SchEDConfig(StrategyConfig):
    name: str = dataclasses.field(default="sched", init=False)
    rule = SchED
    high: float = 7.5
    """Logit-gap threshold at the start."""
    low: float = 2.5
    """Logit-gap threshold at the end."""
    shape: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise DlmcError(f"low={self.low}, high={self.high}: need 0 <= low <= high")
        if self.shape not in SHAPES:
            raise DlmcError(f"shape={self.shape!r} is not one of {', '.join(SHAPES)}")

    def tau(self, p: torch.Tensor) -> torch.Tensor:
        """The threshold at progress p [B] float64 -> [B] float64."""
        falling = 1 - p if self.shape == "linear" else (1 + torch.cos(math.pi * p)) / 2  # 1 -> 0
        return self.low + (self.high - self.low) * falling
