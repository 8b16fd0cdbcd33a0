"""Small [B, K] cases for the strategy tests, and the reference decoder run row by row against a batch."""

import dataclasses

import torch

from dlmc.decoding.llada import LLaDAConfig
from dlmc.strategies import Scores, strategy_config

INF = float("-inf")


def scores(confidence, eligible=None, masked=None, step=0, total_step=0, **extra) -> Scores:
    """Scores from nested lists; not eligible where confidence is -inf unless told."""
    conf = torch.tensor(confidence, dtype=torch.float64)  # [B, K]
    eligible = conf > INF if eligible is None else torch.tensor(eligible)
    masked = eligible if masked is None else torch.tensor(masked)
    B = conf.shape[0]
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in extra.items()}
    return Scores(
        confidence=torch.where(eligible, conf, INF), eligible=eligible, masked=masked,
        step=torch.full((B,), step), total_step=torch.full((B,), total_step), **tensors,
    )


def rule(strategy, **decode):
    config = LLaDAConfig(strategy=strategy, **({"gen_length": 8, "block_length": 4, "steps": 8} | decode))
    return config.strategy.build(config)


def commit(strategy, s: Scores, **decode) -> list[list[int]]:
    """The committed columns of each row."""
    made = rule(strategy_config(strategy), **decode)
    B = len(s.step)
    if s.steps_per_block is None:  # the decode's, for every row (a copy: the case may be reused)
        s = dataclasses.replace(s, steps_per_block=torch.full((B,), made.decode.steps_per_block))
    if s.steps is None:
        s = dataclasses.replace(s, steps=torch.full((B,), made.decode.steps))
    mask = made.commit(s, torch.arange(B))
    return [row.nonzero().squeeze(1).tolist() for row in mask]


def rows_alone(strategy, s: Scores, **decode) -> list[list[int]]:
    """The same, one row at a time: what the reference decoder does."""
    out = []
    for b in range(len(s.step)):
        one = Scores(**{k: (v[b : b + 1] if v is not None else None) for k, v in vars(s).items()})
        out += commit(strategy, one, **decode)
    return out
