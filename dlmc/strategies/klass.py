"""KLASS (KL-adaptive stability sampling; shkim0116/KLASS `stable_confident_decode`): commit every eligible
position whose confidence exceeds `confidence` and whose distribution has stopped moving, its KL divergence
to the previous step below `kl` at each of the last `history` steps; when no position of a row is ready,
commit LLaDA's schedule count of the most confident instead.

The step returns each position's TOP most likely tokens (`top_probs`, `top_ids`), not its distribution, so
the KL is taken over those TOP tokens and one bucket for the rest of the vocabulary; a token the previous
step did not have among its TOP counts as probability 0 there (its term is large: not yet stable). Lumping
tokens together never raises a KL, so this is at most the full KL when both steps share their TOP tokens.
The step computes only the block's positions, so a position's KL history starts at its block's second step
(the official code compares a block's first step with the previous block's last one); and a block repeats
until it is full (the official code moves on after `steps / num_blocks` steps even with masks left).
Confidence is the float64 probability, as the official code; temperature 0 only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError
from dlmc.strategies.base import RowState, Scores, Strategy, StrategyConfig, check_probability
from dlmc.strategies.top_k import schedule_count, top_k

EPS = 1e-12
"""Added inside each log of the KL, as the official code."""


class KLASS(Strategy):
    outputs = ("top_probs", "top_ids")
    greedy = True

    def __init__(self, config: KLASSConfig, decode):
        super().__init__(config, decode)
        self.state = RowState()  # per row: previous top probs and ids [K, TOP], KL history [K, history]

    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        c, probs, ids = self.config, scores.top_probs, scores.top_ids  # [B, K, m]
        K, m = probs.shape[1:]
        fresh = (torch.zeros(K, m, dtype=torch.float64, device=probs.device),
                 torch.full((K, m), -1, dtype=torch.long, device=ids.device),
                 torch.full((K, c.history), float("inf"), dtype=torch.float64, device=probs.device))
        prev_probs, prev_ids, past = self.state.load(rows, scores.starting(), fresh)
        # a block's first step has no previous distribution: its KL is inf (never stable)
        divergence = top_kl(probs, ids, prev_probs, prev_ids)  # [B, K]
        past = torch.cat([past[..., 1:], divergence[..., None]], dim=-1)  # [B, K, history]: the newest last
        self.state.store(rows, (probs, ids, past))
        stable = (past < c.kl).all(-1)  # [B, K]
        ready = stable & (scores.confidence > c.confidence) & scores.eligible  # [B, K]
        return torch.where(ready.any(-1, keepdim=True), ready, top_k(scores.confidence, *self.count(scores)))

    def count(self, scores: Scores) -> tuple[torch.Tensor, int | None]:
        """LLaDA's schedule count of the row's step in its block [B], at least one past the schedule;
        and the largest, where the caller keeps the schedule on the host (`schedule_count`)."""
        k, most = schedule_count(scores, self.decode.block_length)  # [B]
        return k.clamp(min=1), None if most is None else max(most, 1)

    def forget(self, handles: list[int]) -> None:
        self.state.forget(handles)


def top_kl(probs, ids, prev_probs, prev_ids) -> torch.Tensor:
    """KL(now || previous) over the TOP tokens of now plus one bucket for the rest.
    probs, ids, prev_probs, prev_ids [B, K, m] -> [B, K] float64"""
    same = ids[..., :, None] == prev_ids[..., None, :]  # [B, K, m, m]
    before = (same * prev_probs[..., None, :]).sum(-1)  # [B, K, m]: 0 where the previous TOP lacked it
    rest, rest_before = 1 - probs.sum(-1), 1 - before.sum(-1)  # [B, K]
    terms = probs * (torch.log(probs + EPS) - torch.log(before + EPS))  # [B, K, m]
    bucket = rest.clamp(min=0) * (torch.log(rest.clamp(min=0) + EPS) - torch.log(rest_before.clamp(min=0) + EPS))
    return terms.sum(-1) + bucket


@dataclass(frozen=True, kw_only=True)
class KLASSConfig(StrategyConfig):
    name: str = dataclasses.field(default="klass", init=False)
    rule = KLASS
    confidence: float = 0.9
    """A position is ready when its probability exceeds this (official conf_threshold)."""
    kl: float = 0.01
    """... and its KL to the previous step is below this (official kl_threshold) ..."""
    history: int = 2
    """... at each of its last `history` steps (official kl_history_length)."""

    def __post_init__(self) -> None:
        check_probability("confidence", self.confidence)
        if not self.kl > 0:
            raise DlmcError(f"kl={self.kl} must be > 0")
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise DlmcError(f"history={self.history!r} must be an integer >= 1")
