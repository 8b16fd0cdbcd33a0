"""What Prophet and SchED share: LLaDA's schedule inside the block, and an all-in commit of every
remaining mask of the generation once the predictions have converged. Such a rule reads every generated
column each step (`sees_generation`), so the early commit costs no extra step."""

from __future__ import annotations

import torch

from dlmc.strategies.base import Scores
from dlmc.strategies.top_k import TopK


class EarlyCommit(TopK):
    outputs = ("margin",)
    sees_generation = True

    def converged(self, scores: Scores) -> torch.Tensor:
        """[B] bool: fill every remaining mask of these rows now."""
        raise NotImplementedError

    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        scheduled = super().commit(scores, rows)  # [B, K]
        return torch.where(self.converged(scores)[:, None], scores.masked, scheduled)

    def progress(self, scores: Scores) -> torch.Tensor:
        """[B] float64: the share of the decode's steps taken before this one."""
        return scores.total_step.to(torch.float64) / scores.steps


def mean_over(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The float64 mean of values [B, K] over the columns `where` [B, K] bool (NaN over none). -> [B]"""
    kept = torch.where(where, values.to(torch.float64), 0.0)  # [B, K]
    return kept.sum(-1) / where.sum(-1)
