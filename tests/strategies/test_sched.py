import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.strategies import SchEDConfig
from tests.strategies.helpers import INF, commit, rows_alone, scores

MASKED = [[False, True, True, True]]
ELIGIBLE = [[False, True, True, False]]
CONF = [[INF, 0.4, 0.8, INF]]


def test_tau_falls_from_high_to_low():
    p = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert SchEDConfig(high=6, low=2).tau(p).tolist() == [6.0, 4.0, 2.0]
    assert SchEDConfig(high=6, low=2, shape="cosine").tau(p).tolist() == pytest.approx([6.0, 4.0, 2.0])


def test_commits_everything_once_the_mean_gap_over_the_answer_reaches_tau():
    # mean gap over all four columns, decided or not: 4.0; 8 steps, block 4 of 8? gen 4 here
    margin = [[10.0, 2.0, 2.0, 2.0]]
    config = SchEDConfig(high=6, low=2)
    at = lambda step: scores(CONF, eligible=ELIGIBLE, masked=MASKED, margin=margin, total_step=step)  # noqa: E731
    # gen 4, block 4, steps 4: progress step / 4; tau 6, 5, 4, 3
    assert commit(config, at(1), gen_length=4, block_length=4, steps=4) == [[2]]
    assert commit(config, at(2), gen_length=4, block_length=4, steps=4) == [[1, 2, 3]]
    assert rows_alone(config, at(2), gen_length=4, block_length=4, steps=4) == [[1, 2, 3]]


def test_refuses_low_above_high_and_unknown_shapes():
    with pytest.raises(DlmcError, match=r"^low=3, high=2: need 0 <= low <= high$"):
        SchEDConfig(high=2, low=3)
    with pytest.raises(DlmcError, match=r"^shape='step' is not one of linear, cosine$"):
        SchEDConfig(shape="step")
