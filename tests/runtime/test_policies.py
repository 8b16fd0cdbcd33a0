"""Cache policies' planning: which columns a step computes and which it takes from the store."""

import torch

from dlmc.runtime.cache import _Sequence
from dlmc.runtime.policies import Delayed, Dual, Exact, policy_from_dict
from dlmc.spec import DenoiserSpec

M = 99


def spec(attention: str, shift: bool = False) -> DenoiserSpec:
    return DenoiserSpec(family="t", mask_token_id=M, attention=attention, block_size=4 if attention == "block_causal" else None,
                        shift_logits=shift, vocab_size=100, max_length=64)


def stored(tokens: list[int], origin: int) -> _Sequence:
    n = len(tokens)
    t = torch.tensor(tokens)
    return _Sequence(tokens=t, positions=torch.arange(n), keys=torch.zeros(1, 1, n, 1), values=torch.zeros(1, 1, n, 1),
                     kv_tokens=t.clone(), logits=torch.zeros(n, 100), origin=origin, block=0, since_refresh=1)


def test_exact_reuses_the_unchanged_prefix():
    before = [1, 2, 3, 4, 5, 6, 7, M, M, M]
    after = [1, 2, 3, 4, 5, 6, 7, 8, M, M]
    plan = Exact().plan(spec("causal"), stored(before, 7), torch.tensor(after), torch.arange(10))
    assert plan.keys.tolist() == [True] * 7 + [False] * 3
    assert plan.query.tolist() == [False] * 7 + [True] * 3


def test_exact_block_causal_drops_the_changed_block():
    before = [1, 2, 3, 4, 5, 6, 7, M, M, M]
    after = [1, 2, 3, 4, 5, 6, 7, 8, M, M]  # column 7 changed: its block (4..7) is recomputed
    plan = Exact().plan(spec("block_causal"), stored(before, 7), torch.tensor(after),
                     torch.arange(10))
    assert plan.keys.tolist() == [True] * 4 + [False] * 6


def test_exact_identical_canvas_still_computes_one_row():
    tokens = [1, 2, 3, M]
    plan = Exact().plan(spec("causal"), stored(tokens, 3), torch.tensor(tokens), torch.arange(4))
    assert plan.query.tolist() == [False, False, False, True]


def test_dual_computes_the_block_and_shift_adds_the_row_before():
    tokens = [1, 2, 3, 4, M, M, M, M, M, M]  # prompt 0..3, blocks of 3 from column 4; block 0 partly... all masked
    seq = stored(tokens, 4)
    policy = Dual(block_length=3)
    plan = policy.plan(spec("bidirectional"), seq, torch.tensor(tokens), torch.arange(10))
    assert plan.query.nonzero().squeeze(1).tolist() == [4, 5, 6]
    assert plan.keys.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 7, 8, 9]
    plan = policy.plan(spec("bidirectional", shift=True), seq, torch.tensor(tokens), torch.arange(10))
    assert plan.query.nonzero().squeeze(1).tolist() == [3, 4, 5, 6]


def test_a_new_block_is_a_refresh():
    tokens = [1, 2, 3, 4, 5, 6, 7, M, M, M]  # block 0 (4..6) done: block 1 starts
    plan = Dual(block_length=3).plan(spec("bidirectional"), stored(tokens, 4),
                     torch.tensor(tokens), torch.arange(10))
    assert plan.refresh and bool(plan.query.all())


def test_delayed_recomputes_masks_and_fresh_tokens():
    seq = stored([1, 2, M, M, M], 2)
    tokens = torch.tensor([1, 2, 7, M, M])  # column 2 decoded since its K/V were made (with the mask)
    plan = Delayed(refresh=8).plan(spec("bidirectional"), seq, tokens, torch.arange(5))
    assert plan.query.tolist() == [False, False, True, True, True]
    assert plan.keys.tolist() == [True, True, False, False, False]


def test_signature_records_round_trip():
    for record in ({"policy": "exact"}, {"policy": "dual", "block_length": 32},
                   {"policy": "window", "window": 8, "block_length": 16, "refresh": 2}, {"policy": "prefill"}):
        assert policy_from_dict(record).to_dict() == record
