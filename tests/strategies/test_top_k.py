import pytest

from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.strategies import EBConfig, TopKConfig
from tests.strategies.helpers import INF, commit, rows_alone, scores


def test_follows_the_schedule_of_the_step():
    # block 4 over 2 steps per block: 2 then 2
    s = scores([[0.1, 0.9, 0.5, 0.7], [0.8, INF, 0.3, 0.2]], step=1)
    assert commit(TopKConfig(), s, steps=4) == [[1, 3], [0, 2]]
    assert rows_alone(TopKConfig(), s, steps=4) == [[1, 3], [0, 2]]
    # one step per token: 1
    assert commit(TopKConfig(), s) == [[1], [0]]


def test_random_remasking_is_only_for_scheduled_rules():
    LLaDAConfig(strategy=TopKConfig(), remasking="random")
    with pytest.raises(DlmcError, match=r"^remasking='random': the eb strategy ranks by confidence$"):
        LLaDAConfig(strategy=EBConfig(), remasking="random")
