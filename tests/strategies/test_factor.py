import pytest

from dlmc.errors import DlmcError
from dlmc.strategies import FactorConfig
from tests.strategies.helpers import INF, commit, rows_alone, scores


def test_the_longest_prefix_over_the_falling_bar():
    # factor 1: the 2nd needs >= 1 - 1/3, the 3rd >= 1 - 1/4
    s = scores([[0.9, 0.7, 0.6, 0.1], [0.5, 0.99, INF, 0.97]])
    assert commit(FactorConfig(factor=1.0), s) == [[0, 1], [0, 1, 3]]  # row 1: fails at the last: all
    assert rows_alone(FactorConfig(factor=1.0), s) == [[0, 1], [0, 1, 3]]


def test_a_failure_at_the_last_candidate_accepts_everything():
    s = scores([[0.99, 0.98, 0.10, INF]])
    assert commit(FactorConfig(factor=1.0), s) == [[0, 1, 2]]


def test_refuses_a_factor_that_is_not_positive():
    with pytest.raises(DlmcError, match=r"^factor=0.0 must be > 0$"):
        FactorConfig(factor=0.0)
