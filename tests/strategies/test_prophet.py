import pytest

from dlmc.errors import DlmcError
from dlmc.strategies import ProphetConfig
from tests.strategies.helpers import INF, commit, rows_alone, scores

# 8 generated columns, the block is 0..3; columns 0 and 5 are decided
MASKED = [[False, True, True, True, True, False, True, True]] * 2
ELIGIBLE = [[False, True, True, True, False, False, False, False]] * 2
CONF = [[INF, 0.9, 0.5, 0.7, INF, INF, INF, INF]] * 2


def test_commits_every_mask_once_the_gap_clears_the_stage_threshold():
    # mean gap over the masked columns: row 0 (9 + 6 * 5) / 6 = 6.5, row 1 3.0
    margin = [[0.0, 9.0, 5.0, 5.0, 5.0, 100.0, 5.0, 5.0], [0.0, 3.0, 3.0, 3.0, 3.0, 100.0, 3.0, 3.0]]
    early = scores(CONF, eligible=ELIGIBLE, masked=MASKED, margin=margin, total_step=0)
    assert commit(ProphetConfig(), early) == [[1], [1]]  # 7.5 at the start: the schedule's one token
    middle = scores(CONF, eligible=ELIGIBLE, masked=MASKED, margin=margin, total_step=3)  # progress 3/8
    assert commit(ProphetConfig(), middle) == [[1, 2, 3, 4, 6, 7], [1]]
    assert rows_alone(ProphetConfig(), middle) == [[1, 2, 3, 4, 6, 7], [1]]
    late = scores(CONF, eligible=ELIGIBLE, masked=MASKED, margin=margin, total_step=6)  # 2.5 from 0.67
    assert commit(ProphetConfig(), late) == [[1, 2, 3, 4, 6, 7]] * 2


def test_refuses_unordered_stages():
    with pytest.raises(DlmcError, match=r"^gaps=\[2.0, 5.0, 1.0\] must be >= 0 and non-increasing$"):
        ProphetConfig(gaps=(2, 5, 1))
    with pytest.raises(DlmcError, match=r"^gaps: 2 thresholds need 1 boundaries, got 2$"):
        ProphetConfig(gaps=(5, 1))
