import pytest

from dlmc.errors import DlmcError
from dlmc.strategies import EBConfig
from tests.strategies.helpers import commit, rows_alone, scores


def test_commits_the_lowest_entropies_while_the_sum_before_stays_in_budget():
    eligible = [[True, True, True, True], [True, False, True, True]]
    entropy = [[0.30, 0.05, 0.08, 0.9], [0.5, 0.0, 0.6, 2.0]]
    s = scores([[0.5] * 4] * 2, eligible=eligible, entropy=entropy)
    # row 0: sorted 0.05, 0.08, 0.30, 0.9 -> sums before 0, 0.05, 0.13, 0.43: three within 0.15
    # row 1: only the lowest (0.5 alone is over budget); column 1 is not eligible though its entropy is 0
    assert commit(EBConfig(gamma=0.15), s) == [[0, 1, 2], [0]]
    assert rows_alone(EBConfig(gamma=0.15), s) == [[0, 1, 2], [0]]
    assert commit(EBConfig(gamma=0.0), s) == [[1], [0]]


def test_refuses_a_negative_budget():
    with pytest.raises(DlmcError, match=r"^gamma=-1.0 must be >= 0$"):
        EBConfig(gamma=-1.0)
