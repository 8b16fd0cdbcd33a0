import math

import pytest
import torch

from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.strategies import KLASSConfig
from dlmc.strategies.klass import top_kl
from tests.strategies.helpers import rule, scores


def top(probs, ids, step):
    """Scores of one block with each position's top candidates (TOP = 2 here), all eligible."""
    s = scores([[p[0] for p in row] for row in probs], step=step)
    s.top_probs = torch.tensor(probs, dtype=torch.float64)  # [B, K, 2]
    s.top_ids = torch.tensor(ids)  # [B, K, 2]
    s.tokens = s.top_ids[..., 0].clone()
    s.steps_per_block = torch.full((len(probs),), 4)  # block_length 4: one per step on the schedule
    return s


def test_the_kl_over_the_top_tokens_and_the_rest():
    probs, ids = torch.tensor([[[0.5, 0.3]]], dtype=torch.float64), torch.tensor([[[7, 8]]])
    prev = torch.tensor([[[0.4, 0.4]]], dtype=torch.float64)
    kl = top_kl(probs, ids, prev, torch.tensor([[[8, 7]]]))  # previous: 7 -> 0.4, 8 -> 0.4, rest 0.2
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert kl.item() == pytest.approx(expected, abs=1e-9)
    unseen = top_kl(probs, ids, prev, torch.tensor([[[9, 7]]])).item()  # 8 was not among the previous TOP:
    assert unseen > 7  # 0.3 * (log 0.3 - log 1e-12) = 7.93 alone


def test_commits_confident_positions_whose_distribution_stopped_moving_else_the_schedule():
    made = rule(KLASSConfig(confidence=0.5, kl=0.01, history=2))
    still, moving = [[0.8, 0.1], [0.6, 0.3]], [[0.6, 0.3], [0.8, 0.1]]
    ids = [[[7, 8], [3, 4]]]
    # step 0: no history -> the schedule's count (1) by confidence: column 0
    assert made.commit(top([still], ids, 0), torch.tensor([0])).tolist() == [[True, False]]
    # step 1: one KL each (column 0: 0, column 1: 0) but two are needed -> the schedule again
    assert made.commit(top([still], ids, 1), torch.tensor([0])).tolist() == [[True, False]]
    # step 2: column 0 stable twice and 0.8 > 0.5; column 1 stable and 0.6 > 0.5: both ready
    assert made.commit(top([still], ids, 2), torch.tensor([0])).tolist() == [[True, True]]
    # step 3: both moved (KL about 0.16 and 0.24): none ready -> the schedule's one, most confident first
    assert made.commit(top([moving], ids, 3), torch.tensor([0])).tolist() == [[False, True]]


def test_rows_keep_their_history_by_handle_and_a_block_starts_afresh():
    config = KLASSConfig(confidence=0.5, kl=0.01, history=1)
    ids = [[[7, 8], [3, 4]]]
    made = rule(config)
    made.commit(top([[[0.8, 0.1], [0.6, 0.3]]] * 2, ids * 2, 0), torch.tensor([3, 5]))
    both = made.commit(top([[[0.8, 0.1], [0.6, 0.3]], [[0.6, 0.3], [0.8, 0.1]]], ids * 2, 1), torch.tensor([3, 5]))
    assert both.tolist() == [[True, True], [False, True]]  # row 3 stable (both ready); row 5 moved: schedule
    alone = rule(config)
    alone.commit(top([[[0.8, 0.1], [0.6, 0.3]]], ids, 0), torch.tensor([5]))
    assert alone.commit(top([[[0.6, 0.3], [0.8, 0.1]]], ids, 1), torch.tensor([5])).tolist() == [[False, True]]
    # step 0 of a new block: the history is gone, whatever the distribution
    assert made.commit(top([[[0.8, 0.1], [0.6, 0.3]]], ids, 0), torch.tensor([3])).tolist() == [[True, False]]
    made.forget([3, 5])
    assert made.state.kept == {}


def test_refusals_name_the_parameter():
    for field, value, message in [("confidence", 1.5, r"^confidence=1.5 must lie in \[0, 1\]$"),
                                  ("kl", 0.0, r"^kl=0.0 must be > 0$"),
                                  ("history", 0, r"^history=0 must be an integer >= 1$")]:
        with pytest.raises(DlmcError, match=message):
            KLASSConfig(**{field: value})
    with pytest.raises(DlmcError, match=r"^temperature=0.5: the klass strategy decodes at temperature 0 only$"):
        LLaDAConfig(strategy="klass", temperature=0.5)
