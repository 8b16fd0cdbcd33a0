"""EB-sampler (entropy-bounded; SGLang `dllm/algorithm/eb_sampling.py` `EBSampling`): sort the block's
masked positions by the entropy of their predicted distribution, lowest first, and commit the j-th while
the summed entropy of the ones before it stays within `gamma`; the lowest is always committed. The block
repeats until it is full. Entropy is taken in float64 here (SGLang: the logits dtype)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError
from dlmc.strategies.base import Scores, Strategy, StrategyConfig


class EntropyBounded(Strategy):
    outputs = ("entropy",)

    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        return entropy_prefix(scores.entropy, scores.eligible, self.config.gamma)


def entropy_prefix(entropy: torch.Tensor, eligible: torch.Tensor, gamma: float) -> torch.Tensor:
    """entropy [B, K] (any value where not eligible), eligible [B, K] bool -> [B, K] bool"""
    ranked, order = torch.sort(torch.where(eligible, entropy, float("inf")), dim=-1, stable=True)  # [B, K]
    inside = eligible.gather(-1, order)  # [B, K]: eligible ones first
    before = torch.where(inside, ranked, 0.0).cumsum(-1)  # [B, K]: entropy up to and including j
    before = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1]], dim=-1)  # [B, K]: strictly before j
    first = torch.arange(entropy.shape[-1], device=entropy.device) == 0  # [K]
    accepted = inside & ((before <= gamma) | first)  # [B, K] in sorted order
    return torch.zeros_like(accepted).scatter_(-1, order, accepted)


@dataclass(frozen=True, kw_only=True)
class EBConfig(StrategyConfig):
    name: str = dataclasses.field(default="eb", init=False)
    rule = EntropyBounded
    gamma: float = 0.15
    """Entropy budget (nats): a position is committed while the entropies ranked before it sum to <= gamma."""

    def __post_init__(self) -> None:
        if not self.gamma >= 0:
            raise DlmcError(f"gamma={self.gamma} must be >= 0")
