import pytest
import torch

from dlmc.decoding.common import (
    check_prompts,
    fill_token_id,
    first_stop,
    forward_rows,
    gumbel_max_logits,
    left_pad,
    model_device,
    num_transfer_tokens,
    pad_token_id,
    sample_categorical,
    shift_right,
    stop_token_ids,
    token_probability,
    top_k_filter,
    top_p_filter,
)
from dlmc.errors import DlmcError
from tests.decoding.conftest import EOS, EOT, MASK, PAD, ScriptedModel, TinyDenoiser, toy_spec


@pytest.mark.parametrize(
    ("count", "steps", "expected"),
    [(10, 4, [3, 3, 2, 2]), (8, 4, [2, 2, 2, 2]), (2, 4, [1, 1, 0, 0]), (5, 1, [5])],
)
def test_num_transfer_tokens_splits_evenly_remainder_first(count, steps, expected):
    assert num_transfer_tokens(count, steps) == expected


def test_gumbel_at_zero_temperature_is_identity_and_draws_nothing():
    logits = torch.randn(3, 5)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert gumbel_max_logits(logits, 0.0, generator) is logits
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gumbel_matches_the_official_formula_with_the_global_seed(temperature):
    logits = torch.randn(1, 4, 9, dtype=torch.bfloat16)
    torch.manual_seed(11)
    logits64 = logits.to(torch.float64)
    noise = torch.rand_like(logits64, dtype=torch.float64)
    expected = logits64.exp() / (-torch.log(noise)) ** temperature
    ours = gumbel_max_logits(logits[0], temperature, torch.Generator().manual_seed(11))
    assert ours.dtype == torch.float64
    assert torch.equal(ours, expected[0])


def test_sample_categorical_matches_torch_categorical_with_the_global_seed():
    probs = torch.softmax(torch.randn(6, 40, dtype=torch.float64), dim=-1)
    torch.manual_seed(3)
    expected = torch.distributions.Categorical(probs=probs).sample()
    assert torch.equal(sample_categorical(probs, torch.Generator().manual_seed(3)), expected)


def test_token_probability_reads_the_softmax_in_the_requested_dtype():
    logits = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float32)
    p = token_probability(logits, torch.tensor([2]), torch.float64)
    assert p.dtype == torch.float64
    assert p.item() == pytest.approx(torch.softmax(logits.double(), -1)[0, 2].item())


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert top_k_filter(logits, 2, -99.0).tolist() == [[-99.0, 4.0, 3.0, -99.0]]
    assert torch.equal(top_k_filter(logits, 10, -99.0), logits)  # k larger than the vocabulary


def test_top_p_filter_keeps_the_token_that_crosses_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = top_p_filter(logits, 0.7, float("-inf"))
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.1, float("-inf"))).tolist() == [True, False, False, False]


def test_shift_right_moves_row_i_minus_one_to_i_and_reuses_row_zero():
    logits = torch.arange(4.0).view(4, 1)
    assert shift_right(logits).flatten().tolist() == [0.0, 0.0, 1.0, 2.0]


def test_left_pad_builds_mask_and_logical_positions():
    rows = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    input_ids, mask, positions = left_pad(rows, pad_id=PAD)
    assert input_ids.tolist() == [[5, 6, 7], [PAD, PAD, 9]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_left_pad_without_padding_passes_no_mask_and_keeps_given_positions():
    rows = [torch.tensor([1, 2]), torch.tensor([3, 4])]
    _, mask, positions = left_pad(rows, pad_id=PAD, positions=[torch.tensor([0, 5]), torch.tensor([2, 1])])
    assert mask is None
    assert positions.tolist() == [[0, 5], [2, 1]]


def test_forward_rows_cuts_the_padding_off_each_row():
    model = ScriptedModel(lambda ids, pos: torch.nn.functional.one_hot(pos, 12).double())
    logits = forward_rows(model, [torch.tensor([1, 2, 3]), torch.tensor([4])], pad_id=PAD)
    assert [tuple(x.shape) for x in logits] == [(3, 12), (1, 12)]
    assert logits[1][0].argmax().item() == 0  # the single token sits at logical position 0


def test_model_device_falls_back_to_parameters_then_cpu():
    assert model_device(TinyDenoiser(toy_spec())) == torch.device("cpu")
    assert model_device(lambda *a: None) == torch.device("cpu")


def test_special_ids_and_stop_tokens():
    spec = toy_spec()
    assert pad_token_id(spec) == PAD and fill_token_id(spec) == PAD
    no_pad = toy_spec(pad_token_id=None)
    assert pad_token_id(no_pad) == EOS and fill_token_id(no_pad) == EOS
    assert stop_token_ids(spec, None) == (EOS, EOT)
    assert stop_token_ids(spec, (3,)) == (3,)
    assert first_stop(torch.tensor([1, EOT, EOS]), (EOS, EOT)) == 1
    assert first_stop(torch.tensor([1, 2]), (EOS,)) is None


@pytest.mark.parametrize(
    ("spec", "prompts", "message"),
    [
        (toy_spec(), [], "prompts is empty"),
        (toy_spec(), [[1], []], "prompts[1] is empty"),
        (toy_spec(), [[1, MASK]], "contains the mask token"),
        (toy_spec(), [[1, 99]], "outside the vocabulary"),
        (toy_spec(pad_token_id=MASK), [[1]], "pad_token_id"),
    ],
)
def test_check_prompts_rejects_bad_prompts(spec, prompts, message):
    with pytest.raises(DlmcError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_prompts(spec, prompts)
