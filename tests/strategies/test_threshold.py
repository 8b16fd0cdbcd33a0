import pytest

from dlmc.errors import DlmcError
from dlmc.strategies import ThresholdConfig
from tests.strategies.helpers import INF, commit, rows_alone, scores


def test_commits_at_or_above_the_threshold_and_always_the_best():
    s = scores([[0.5, 0.95, 0.9, INF], [0.3, 0.2, INF, 0.1]])
    assert commit(ThresholdConfig(threshold=0.9), s) == [[1, 2], [0]]
    assert rows_alone(ThresholdConfig(threshold=0.9), s) == [[1, 2], [0]]


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_refuses_a_threshold_outside_the_unit_interval(value):
    with pytest.raises(DlmcError, match=r"^threshold=.* must lie in \(0, 1\]$"):
        ThresholdConfig(threshold=value)
