"""Prophet (pixeli99/Prophet `generate_earlyexit.py`, arXiv 2508.19982): LLaDA's schedule, and once the
mean top-1 minus top-2 logit gap says the answer has converged, commit every remaining mask of the
generation at once. The gap threshold falls with progress (steps taken / `steps`): 7.5 before 0.33,
5.0 before 0.67, 2.5 after. The official code averages over five forced answer positions ("The answer
is" written at fixed places); without a task-specific answer slot, this averages over every generated
position still masked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError
from dlmc.strategies.base import Scores, StrategyConfig
from dlmc.strategies.early_commit import EarlyCommit, mean_over


class Prophet(EarlyCommit):
    def converged(self, scores: Scores) -> torch.Tensor:
        c = self.config
        gap = mean_over(scores.margin, scores.masked)  # [B]
        p = self.progress(scores)  # [B]
        bounds = torch.tensor(c.boundaries, dtype=torch.float64, device=p.device)  # [n - 1]
        stage = torch.bucketize(p, bounds, right=True)  # [B]: which threshold applies
        threshold = torch.tensor(c.gaps, dtype=torch.float64, device=p.device)[stage]  # [B]
        return gap >= threshold


@dataclass(frozen=True, kw_only=True)
class ProphetConfig(StrategyConfig):
    name: str = dataclasses.field(default="prophet", init=False)
    rule = Prophet
    gaps: tuple[float, ...] = (7.5, 5.0, 2.5)
    """Logit-gap thresholds, one per progress stage, non-increasing."""
    boundaries: tuple[float, ...] = (0.33, 0.67)
    """Progress values where the next stage begins, increasing inside (0, 1)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "gaps", tuple(float(g) for g in self.gaps))
        object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
        if len(self.gaps) != len(self.boundaries) + 1:
            raise DlmcError(f"gaps: {len(self.gaps)} thresholds need {len(self.gaps) - 1} boundaries, "
                            f"got {len(self.boundaries)}")
        if any(g < 0 for g in self.gaps) or list(self.gaps) != sorted(self.gaps, reverse=True):
            raise DlmcError(f"gaps={list(self.gaps)} must be >= 0 and non-increasing")
        if any(not 0 < b < 1 for b in self.boundaries) or list(self.boundaries) != sorted(set(self.boundaries)):
            raise DlmcError(f"boundaries={list(self.boundaries)} must increase strictly inside (0, 1)")
