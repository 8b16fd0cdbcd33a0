"""The strategies' commit rules (the fused loop's) on [B, K] tensors choose exactly what the reference decoder chooses."""

import pytest
import torch

from dlmc.decoding.llada import _factor_choice, _threshold_choice
from dlmc.strategies.factor import factor_prefix
from dlmc.strategies.threshold import above_threshold
from dlmc.strategies.top_k import top_k


def confidences(seed: int, batch: int = 6, k: int = 8) -> torch.Tensor:
    """Distinct float64 confidences, some rows with ineligible (-inf) entries and values near 1."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(batch, k, generator=g, dtype=torch.float64) ** 0.2  # skewed towards 1
    ineligible = torch.rand(batch, k, generator=g) < 0.3
    ineligible[:, 0] = False  # every row keeps a candidate, as a block with masks does
    return conf.masked_fill(ineligible, float("-inf"))


def chosen(mask_row: torch.Tensor) -> set[int]:
    return set(mask_row.nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_threshold_is_the_reference_choice(seed, threshold):
    conf = confidences(seed)
    commit = above_threshold(conf, threshold)
    for row, mask in zip(conf, commit):
        candidates = int((row > float("-inf")).sum())
        assert chosen(mask) == set(_threshold_choice(row, candidates, threshold).tolist())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("factor", [0.2, 1.0, 3.0])
def test_factor_is_the_reference_choice(seed, factor):
    conf = confidences(seed)
    commit = factor_prefix(conf, factor)
    for row, mask in zip(conf, commit):
        assert chosen(mask) == set(_factor_choice(row, row > float("-inf"), factor).tolist())


def test_factor_accepts_everything_on_a_failure_at_the_last_candidate():
    # the official off-by-one, as `factor_accept_count` reproduces it
    conf = torch.tensor([[0.99, 0.98, 0.10, float("-inf")]], dtype=torch.float64)
    assert chosen(factor_prefix(conf, 1.0)[0]) == {0, 1, 2}


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_takes_the_most_confident(k):
    conf = confidences(0)
    counts = torch.arange(len(conf)) % k + 1  # each row its own count, as rows at different steps
    commit = top_k(conf, counts)
    for row, mask, n in zip(conf, commit, counts.tolist()):
        assert chosen(mask) == set(torch.topk(row, n).indices.tolist())
