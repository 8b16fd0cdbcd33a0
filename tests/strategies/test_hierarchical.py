import pytest

from dlmc.errors import DlmcError
from dlmc.strategies import HierarchicalConfig
from tests.strategies.helpers import INF, commit, rows_alone, scores


def test_the_best_of_each_masked_run_above_low_and_everything_above_high():
    config = HierarchicalConfig(threshold=0.9, low_threshold=0.5)
    # runs [0, 1], [3, 4, 5], [7]: their bests 0.6 (col 1), 0.7 (col 3, the first of a tie), 0.4 (under low);
    # col 5 passes the high threshold on its own
    s = scores([[0.2, 0.6, INF, 0.7, 0.3, 0.7, INF, 0.4]])
    assert commit(config, s) == [[1, 3]]
    s = scores([[0.2, 0.6, INF, 0.7, 0.3, 0.95, INF, 0.4]])
    assert commit(config, s) == [[1, 5]]


def test_always_the_best_and_rows_alone_agree():
    config = HierarchicalConfig(threshold=0.9, low_threshold=0.5)
    s = scores([[0.1, 0.3, 0.2, INF], [0.6, INF, 0.55, 0.8]])
    assert commit(config, s) == [[1], [0, 3]]  # col 2 is not its run's best
    assert rows_alone(config, s) == [[1], [0, 3]]  # col 2 is not its run's best


def test_refuses_thresholds_out_of_order_or_range():
    with pytest.raises(DlmcError, match=r"^low_threshold=0.95 must not exceed threshold=0.9$"):
        HierarchicalConfig(threshold=0.9, low_threshold=0.95)
    with pytest.raises(DlmcError, match=r"^threshold=1.5 must lie in \[0, 1\]$"):
        HierarchicalConfig(threshold=1.5)
