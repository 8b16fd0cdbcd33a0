import pytest

from dlmc.errors import DlmcError
from dlmc.strategies import LocalLeapConfig
from tests.strategies.helpers import INF, commit, rows_alone, scores


def test_anchors_and_their_confident_neighbours():
    config = LocalLeapConfig(threshold=0.9, low_threshold=0.7, radius=2)
    # anchor at 2; 0 and 4 are within 2 and >= 0.7; 5 is >= 0.7 but 3 away; 1 is near but not confident
    s = scores([[0.75, 0.5, 0.95, INF, 0.8, 0.85, 0.1, 0.2]])
    assert commit(config, s) == [[0, 2, 4]]
    assert commit(LocalLeapConfig(threshold=0.9, low_threshold=0.7, radius=3), s) == [[0, 2, 4, 5]]


def test_without_an_anchor_the_single_best():
    config = LocalLeapConfig(threshold=0.9, low_threshold=0.7, radius=4)
    s = scores([[0.8, 0.85, 0.3, INF], [0.95, 0.72, INF, 0.1]])
    assert commit(config, s) == [[1], [0, 1]]
    assert rows_alone(config, s) == [[1], [0, 1]]


def test_refuses_a_negative_radius():
    with pytest.raises(DlmcError, match=r"^radius=-1 must be an integer >= 0$"):
        LocalLeapConfig(radius=-1)
