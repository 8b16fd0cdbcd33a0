"""The strategy interface: a frozen config, and per decode one rule object that owns the batch's state.

A strategy decides, every step, which of a batch's candidate positions to commit. It sees only [B, K]
tensors (`Scores`): K columns of every row, the current block's (or, for a strategy that
`sees_generation`, every generated column), with static shapes, so the fused loop around a compiled
step never leaves the device except to ask whether the batch is done (under LLaDA's schedule not
even that: the loop keeps the schedule on the host, `Scores.host_step`). The reference LLaDA decoder
(`dlmc.decoding.llada`) calls the same rule with B = 1 for each row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from dlmc.errors import DlmcError

SCORES = ("confidence", "confidence64")
"""Which top-1 probability a rule ranks: in the logits dtype (LLaDA) or float64 (Fast-dLLM)."""
EXTRA_OUTPUTS = ("entropy", "margin", "top_probs", "top_ids")
"""Per-position values beyond the token and its probability that a rule may read; a fused step
carries one only when compiled for it (fuse_decode `outputs`). top_probs / top_ids are [B, K, TOP]."""
TOP = 8
"""How many candidates per position `top_probs` / `top_ids` summarise (fewer when the vocabulary is smaller)."""


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """A strategy's parameters. `name` is a field (not settable) so that `dataclasses.asdict` of a decoder
    config (a recipe's decode defaults, an artifact manifest) keeps which strategy it was."""

    name: str = dataclasses.field(default="", init=False)
    rule: ClassVar[type[Strategy]]

    def build(self, decode) -> Strategy:
        """The rule for one decode with the LLaDA config `decode` (its schedule, block length)."""
        return self.rule(self, decode)


@dataclass
class Scores:
    """One step's per-position values for the K columns handed to the rule. [B, K] each."""

    confidence: torch.Tensor
    """The score the rule ranks: `score` of the rule (the chosen token's probability, or a random draw
    under remasking='random'); -inf wherever `eligible` is False."""
    eligible: torch.Tensor
    """bool: masked and inside the row's current block."""
    masked: torch.Tensor
    """bool: still a mask token (inside the block or not)."""
    step: torch.Tensor
    """[B] int64: steps the row has taken inside its current block."""
    total_step: torch.Tensor
    """[B] int64: steps the row has taken since the decode began (its NFE without guidance)."""
    steps_per_block: torch.Tensor | None = None
    """[B] int64: each row's steps per block (its own `steps / num_blocks`: rows of one running batch
    may differ); set by every caller before a rule reads it."""
    steps: torch.Tensor | None = None
    """[B] int64: each row's total steps (its `steps`), for progress-aware rules."""
    entropy: torch.Tensor | None = None
    """float64 entropy -sum p log p of each position's distribution (rules with `outputs` 'entropy')."""
    margin: torch.Tensor | None = None
    """top-1 minus top-2 logit (rules with `outputs` 'margin')."""
    top_probs: torch.Tensor | None = None
    """[B, K, TOP] float64: each position's highest probabilities, descending (`outputs` 'top_probs')."""
    top_ids: torch.Tensor | None = None
    """[B, K, TOP] int64: their token ids (`outputs` 'top_ids')."""
    tokens: torch.Tensor | None = None
    """[B, K] int64: the token each position commits; set by every caller, which writes it after `commit`
    (a rule that re-ranks the candidates, `credit`, replaces it)."""
    host_step: list[int] | None = None
    """`step` as host ints, where the caller keeps a copy (the fused loop): a rule sizing its work by
    the step (LLaDA's schedule) reads these instead of the device tensor, which would sync the host."""
    host_steps_per_block: list[int] | None = None
    """`steps_per_block` as host ints, alongside `host_step`."""

    def starting(self) -> list[bool]:
        """Per row: whether this step is the first of its block (from `host_step` where the caller keeps it)."""
        if self.host_step is not None:
            return [step == 0 for step in self.host_step]
        return (self.step == 0).tolist()


class Strategy:
    """One decode's rule. Subclasses set the class attributes and implement `commit`."""

    score: ClassVar[str] = "confidence64"
    """Which of SCORES it ranks."""
    outputs: ClassVar[tuple[str, ...]] = ()
    """Which of EXTRA_OUTPUTS it reads."""
    scheduled: ClassVar[bool] = False
    """A block ends after `steps_per_block` steps (LLaDA's schedule), not when it is full."""
    sees_generation: ClassVar[bool] = False
    """Reads every generated column each step (an early commit fills all of them), not only the block's."""
    random_remasking: ClassVar[bool] = False
    """Can rank by remasking='random' draws instead of confidence."""
    greedy: ClassVar[bool] = False
    """Decodes at temperature 0 only (it re-ranks or compares the step's distributions, not a draw)."""

    def __init__(self, config: StrategyConfig, decode):
        self.config = config
        self.decode = decode

    def commit(self, scores: Scores, rows: torch.Tensor) -> torch.Tensor:
        """Which positions to commit. `rows` [B] are the batch indices of the rows in `scores` (rows
        that finished leave the batch), for a rule keeping per-row state (the fused loop's are on the
        host: reading them costs no sync). -> [B, K] bool, a subset of
        `scores.masked` (of `scores.eligible` unless the rule commits beyond the block)."""
        raise NotImplementedError

    def forget(self, handles: list[int]) -> None:
        """Rows that left the batch: drop whatever the rule kept for them."""


class RowState:
    """A rule's per-row tensors, kept by row handle so that rows can join and leave between steps."""

    def __init__(self):
        self.kept: dict[int, tuple[torch.Tensor, ...]] = {}

    def load(self, rows: torch.Tensor, reset: list[bool], fresh: tuple[torch.Tensor, ...]) -> tuple:
        """Each row's tensors stacked [B, ...]; `fresh` (one row's) where `reset` or the row is new."""
        chosen = [fresh if r or h not in self.kept else self.kept[h] for h, r in zip(rows.tolist(), reset)]
        return tuple(torch.stack(parts) for parts in zip(*chosen))

    def store(self, rows: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> None:
        for b, handle in enumerate(rows.tolist()):
            self.kept[handle] = tuple(t[b] for t in tensors)

    def forget(self, handles: list[int]) -> None:
        for handle in handles:
            self.kept.pop(handle, None)


def best(confidence: torch.Tensor) -> torch.Tensor:
    """The most confident eligible column of every row, as a mask. [B, K] -> [B, K] bool"""
    top = confidence.argmax(-1, keepdim=True)  # [B, 1]
    return torch.zeros_like(confidence, dtype=torch.bool).scatter_(-1, top, True)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum p log p of each row's softmax, in float64 (EB-sampler). [..., V] -> [...] float64"""
    log_p = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [..., V]
    return -torch.where(log_p > float("-inf"), log_p.exp() * log_p, 0.0).sum(-1)


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit (Prophet, SchED), in the logits dtype. [..., V] -> [...]"""
    top2 = logits.topk(2, dim=-1).values  # [..., 2]
    return top2[..., 0] - top2[..., 1]


def top_probs(logits: torch.Tensor) -> torch.Tensor:
    """The TOP highest float64 probabilities, descending (KLASS, credit). [..., V] -> [..., TOP] float64"""
    return torch.softmax(logits.to(torch.float64), dim=-1).topk(min(TOP, logits.shape[-1]), dim=-1).values


def top_ids(logits: torch.Tensor) -> torch.Tensor:
    """Their token ids, ranked as `top_probs`. [..., V] -> [..., TOP] int64"""
    return torch.softmax(logits.to(torch.float64), dim=-1).topk(min(TOP, logits.shape[-1]), dim=-1).indices


def check_probability(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise DlmcError(f"{name}={value} must lie in [0, 1]")
