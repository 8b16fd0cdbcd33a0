"""CreditDecoding (arXiv 2510.06133; dInfer `CreditThresholdParallelDecoder`): every position keeps a
credit per token over its block. Each step the credits decay by `beta`, the position's top-1 token gains
p_top1 ** `gamma` (masked positions only), and the threshold rule runs on logits + `alpha` log(1 + credit):
a token the position kept predicting can be committed before its own probability reaches the threshold.

dInfer keeps the credit as a dense [B, L_block, V] matrix. Here a row keeps at most TOP credited tokens per
position (evicting the least credited) and fuses the credit over the step's TOP candidates (`top_probs`,
`top_ids`): a credited token is always one of them while it stays among the TOP most likely, so the fused
argmax and probability are dInfer's unless a credited token fell out of the TOP (then its credit is left out).
The credit lives in float64 (dInfer: float32); the commit is the threshold strategy's (every fused
probability >= threshold, and always the best; dInfer: >= min(threshold, best - 1e-5)). Temperature 0 only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.decoding.common import check_unit_interval
from dlmc.errors import DlmcError
from dlmc.strategies.base import TOP, RowState, Scores, Strategy, StrategyConfig, check_probability
from dlmc.strategies.threshold import above_threshold


class Credit(Strategy):
    outputs = ("top_probs", "top_ids")
    greedy = True

    def __init__(self, config: CreditConfig, decode):
        super().__init__(config, decode)
        self.state = RowState()  # per row: credited ids [K, TOP] int64 (-1: free), credits [K, TOP] float64

    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        c, probs, ids = self.config, scores.top_probs, scores.top_ids  # [B, K, m] each
        B, K, m = probs.shape
        fresh = (torch.full((K, TOP), -1, dtype=torch.long, device=ids.device),
                 torch.zeros(K, TOP, dtype=torch.float64, device=probs.device))
        held, credit = self.state.load(rows, scores.starting(), fresh)  # [B, K, TOP] each: a new block starts empty
        held, credit = add_credit(held, credit * c.beta, ids[..., 0], probs[..., 0] ** c.gamma, scores.eligible)
        self.state.store(rows, (held, credit))
        tokens, confidence = fuse(probs, ids, held, credit, c.alpha)  # [B, K] each
        scores.tokens = torch.where(scores.eligible, tokens, scores.tokens)
        return above_threshold(torch.where(scores.eligible, confidence, float("-inf")), c.threshold)

    def forget(self, handles: list[int]) -> None:
        self.state.forget(handles)


def add_credit(held, credit, top1, boost, eligible):
    """Add `boost` [B, K] to the credit of token `top1` [B, K] where `eligible`; a token not held takes the
    least credited slot. held [B, K, S] int64, credit [B, K, S] float64 -> both updated."""
    match = held == top1[..., None]  # [B, K, S]
    found = match.any(-1)  # [B, K]
    slot = torch.where(found, match.long().argmax(-1), credit.argmin(-1))[..., None]  # [B, K, 1]
    kept = torch.where(found[..., None], credit.gather(-1, slot), 0.0)  # [B, K, 1]: an evicted token's goes
    new_credit = credit.scatter(-1, slot, kept + boost[..., None])
    new_held = held.scatter(-1, slot, top1[..., None])
    on = eligible[..., None]  # [B, K, 1]
    return torch.where(on, new_held, held), torch.where(on, new_credit, credit)


def fuse(probs, ids, held, credit, alpha):
    """softmax(logits + alpha log(1 + credit)) over the candidates: each candidate's probability times
    (1 + its credit) ** alpha, renormalised by the mass the credit moved (the rest of the vocabulary has no
    credit). probs, ids [B, K, m]; held, credit [B, K, S] -> (best token [B, K] int64, its probability [B, K])"""
    own = ((ids[..., :, None] == held[..., None, :]) * credit[..., None, :]).sum(-1)  # [B, K, m]
    weight = (1 + own) ** alpha  # [B, K, m]
    boosted = probs * weight  # [B, K, m]: unnormalised fused probabilities
    total = 1 + (probs * (weight - 1)).sum(-1)  # [B, K]: the fused normaliser over the unfused one
    best = boosted.argmax(-1, keepdim=True)  # [B, K, 1]
    return ids.gather(-1, best).squeeze(-1), boosted.gather(-1, best).squeeze(-1) / total


@dataclass(frozen=True, kw_only=True)
class CreditConfig(StrategyConfig):
    name: str = dataclasses.field(default="credit", init=False)
    rule = Credit
    threshold: float = 0.9
    """Commit every eligible position whose fused probability reaches it (and always the best)."""
    alpha: float = 0.7
    """Weight of log(1 + credit) added to the logits (dInfer credit_alpha)."""
    beta: float = 0.8
    """Decay of every credit per step (dInfer decay_beta)."""
    gamma: float = 0.2
    """The top-1 token gains p_top1 ** gamma each step (dInfer boost_gamma)."""

    def __post_init__(self) -> None:
        check_unit_interval("threshold", self.threshold)
        if not self.alpha >= 0:
            raise DlmcError(f"alpha={self.alpha} must be >= 0")
        check_probability("beta", self.beta)
        if not self.gamma >= 0:
            raise DlmcError(f"gamma={self.gamma} must be >= 0")
