import pytest
import torch

from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.strategies import CreditConfig
from tests.strategies.helpers import rule, scores


def top(probs, ids, **kw):
    """Scores of one block of K positions with their top candidates (TOP = 2 here), all eligible."""
    s = scores([[p[0] for p in row] for row in probs], **kw)
    s.top_probs = torch.tensor(probs, dtype=torch.float64)  # [B, K, 2]
    s.top_ids = torch.tensor(ids)  # [B, K, 2]
    s.tokens = s.top_ids[..., 0].clone()  # [B, K]
    s.steps_per_block = torch.full((len(probs),), 4)
    return s


def test_a_token_kept_on_top_gains_credit_and_is_committed_before_its_probability_reaches_the_threshold():
    made = rule(CreditConfig(threshold=0.6, alpha=1.0, beta=0.5, gamma=1.0))
    first = top([[[0.5, 0.3], [0.4, 0.35]]], [[[7, 8], [3, 4]]], step=0)
    # credit after step 0: position 0 token 7: 0.5; position 1 token 3: 0.4.
    # fused p(7) = 0.5 * 1.5 / (1 + 0.5 * 0.5) = 0.6: committed; p(3) = 0.4 * 1.4 / (1 + 0.4 * 0.4) = 0.4828
    assert made.commit(first, torch.tensor([0])).tolist() == [[True, False]]
    second = top([[[0.5, 0.3], [0.4, 0.35]]], [[[7, 8], [4, 3]]], step=1)
    # position 1 now ranks token 4 first: credit 4: 0.4; token 3 decays to 0.2.
    # fused: 4 -> 0.4 * 1.4 = 0.56, 3 -> 0.35 * 1.2 = 0.42, normaliser 1 + 0.16 + 0.07 = 1.23: token 4, 0.4553
    mask = made.commit(second, torch.tensor([0]))
    assert mask.tolist() == [[True, False]]  # the best always, position 1 below the threshold
    assert second.tokens.tolist() == [[7, 4]]
    third = top([[[0.5, 0.3], [0.3, 0.29]]], [[[7, 8], [3, 4]]], step=2)
    # position 1: token 3 credit 0.1 + 0.3 = 0.4, token 4 decays to 0.2: 0.3 * 1.4 = 0.42 beats 0.29 * 1.2
    made.commit(third, torch.tensor([0]))
    assert third.tokens[0, 1] == 3


def test_credit_wins_over_a_slightly_more_probable_token():
    made = rule(CreditConfig(threshold=0.9, alpha=1.0, beta=1.0, gamma=1.0))
    made.commit(top([[[0.5, 0.3]]], [[[7, 8]]], step=0), torch.tensor([0]))
    s = top([[[0.45, 0.4]]], [[[8, 7]]], step=1)
    made.commit(s, torch.tensor([0]))  # 8: 0.45 * (1 + 0.45) = 0.6525 beats 7: 0.4 * (1 + 0.5) = 0.6
    assert s.tokens.tolist() == [[8]]
    s = top([[[0.42, 0.4]]], [[[8, 7]]], step=2)  # 7: 0.4 * 1.5 = 0.6; 8: 0.42 * (1 + 0.45 + 0.42) = 0.785
    made.commit(s, torch.tensor([0]))
    assert s.tokens.tolist() == [[8]]
    fresh = rule(CreditConfig(threshold=0.9, alpha=1.0, beta=1.0, gamma=1.0))
    fresh.commit(top([[[0.5, 0.3]]], [[[7, 8]]], step=0), torch.tensor([0]))
    s = top([[[0.41, 0.4]]], [[[8, 7]]], step=1)  # 7: 0.4 * 1.5 = 0.6 beats 8: 0.41 * 1.41 = 0.578
    fresh.commit(s, torch.tensor([0]))
    assert s.tokens.tolist() == [[7]]


def test_a_new_block_starts_without_credit_and_rows_keep_their_own_by_handle():
    config = CreditConfig(threshold=0.55, alpha=1.0, beta=1.0, gamma=1.0)
    batch = rule(config)
    batch.commit(top([[[0.5, 0.1]], [[0.2, 0.1]]], [[[7, 8]], [[7, 8]]], step=0), torch.tensor([4, 9]))
    s = top([[[0.4, 0.1]], [[0.4, 0.1]]], [[[7, 8]], [[7, 8]]], step=1)
    # handle 4: credit 0.9 -> 0.4 * 1.9 / (1 + 0.4 * 0.9) = 0.5588; handle 9: credit 0.6 -> 0.4 * 1.6 / 1.24
    assert batch.commit(s, torch.tensor([4, 9])).tolist() == [[True], [True]]  # each row's best
    s = top([[[0.4, 0.1]]], [[[7, 8]]], step=1, eligible=[[True]])
    s.steps_per_block = torch.full((1,), 4)
    alone = rule(config)
    alone.commit(top([[[0.2, 0.1]]], [[[7, 8]]], step=0), torch.tensor([9]))
    single = alone.commit(top([[[0.4, 0.1]]], [[[7, 8]]], step=1), torch.tensor([9]))
    assert single.tolist() == [[True]]
    batch.forget([4])
    assert list(batch.state.kept) == [9]
    again = top([[[0.4, 0.1]]], [[[7, 8]]], step=0)
    batch.commit(again, torch.tensor([9]))  # step 0: a new block, the old credit is gone
    assert batch.state.kept[9][1][0].tolist() == [0.4] + [0.0] * 7  # TOP slots


def test_refusals_name_the_parameter():
    for field, value, message in [("threshold", 0.0, r"^threshold=0.0 must lie in \(0, 1\]$"),
                                  ("alpha", -1.0, r"^alpha=-1.0 must be >= 0$"),
                                  ("beta", 1.5, r"^beta=1.5 must lie in \[0, 1\]$"),
                                  ("gamma", -0.5, r"^gamma=-0.5 must be >= 0$")]:
        with pytest.raises(DlmcError, match=message):
            CreditConfig(**{field: value})
    with pytest.raises(DlmcError, match=r"^temperature=0.5: the credit strategy decodes at temperature 0 only$"):
        LLaDAConfig(strategy="credit", temperature=0.5)
