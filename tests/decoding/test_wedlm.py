import pytest
import torch

from dlmc.decoding.wedlm import WeDLMConfig, generate
from dlmc.errors import DlmcError
from tests.decoding.conftest import (
    EOS,
    MASK,
    PAD,
    PROMPTS,
    TinyDenoiser,
    assert_batch_equals_single,
    by_position,
    peaked,
    toy_spec,
)

SPEC = toy_spec(attention="causal")
UNIFORM = torch.zeros(12, dtype=torch.float64)  # entropy ln 12 ~ 2.48; greedy token 0


def test_window_is_reordered_filled_first_with_logical_positions():
    # prompt at 0..2, window at 3..6; only position 5 is certain
    model = by_position({5: peaked(7, 0.99)}, default=UNIFORM)
    generate(model, SPEC, [[1, 2, 3]], WeDLMConfig(max_new_tokens=8, window_size=4))
    first, second, third, fourth = model.calls[:4]
    assert first.input_ids[0].tolist() == [1, 2, 3, MASK, MASK, MASK, MASK]
    assert first.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    # step 1 filled position 5 only; nothing before it is filled, so nothing is committed
    assert second.input_ids[0].tolist() == [1, 2, 3, 7, MASK, MASK, MASK]
    assert second.position_ids[0].tolist() == [0, 1, 2, 5, 3, 4, 6]
    # step 2 filled position 3 (nothing was below the threshold: the lowest, the first mask, wins);
    # step 3 commits it and appends one mask at 7
    assert third.input_ids[0].tolist() == [1, 2, 3, 0, 7, MASK, MASK, MASK]
    assert third.position_ids[0].tolist() == [0, 1, 2, 3, 5, 4, 6, 7]
    # 3 is committed now; step 3 filled 4, so 4 and 5 lead the window and two masks are appended
    assert fourth.input_ids[0].tolist() == [1, 2, 3, 0, 0, 7, MASK, MASK, MASK, MASK]
    assert fourth.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_parallel_fill_below_threshold_and_prefix_commit():
    rows = {3: peaked(4, 0.99), 4: peaked(5, 0.99), 6: peaked(6, 0.99)}
    model = by_position(rows, default=UNIFORM)
    out = generate(model, SPEC, [[1, 2, 3]], WeDLMConfig(max_new_tokens=4, window_size=4))
    # step 1 fills 3, 4 and 6 at once; step 2 commits 3, 4 (6 waits for 5) and fills 5
    assert model.calls[1].input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, MASK]
    assert model.calls[1].position_ids[0].tolist() == [0, 1, 2, 3, 4, 6, 5]
    assert model.calls[2].input_ids[0].tolist() == [1, 2, 3, 4, 5, 0, 6]
    assert out.output_ids == [[4, 5, 0, 6]]
    assert out.nfe == 3


def test_distance_penalty_prefers_earlier_masks():
    # positions 3..5 equally uncertain: the penalty makes the first one the lowest
    model = by_position({}, default=UNIFORM)
    out = generate(model, SPEC, [[1]], WeDLMConfig(max_new_tokens=3, window_size=3, entropy_threshold=None))
    filled_first = model.calls[1].position_ids[0, 1].item()
    assert filled_first == 1
    assert out.nfe == 4  # one fill per step, the last commit one step later


def test_stops_at_eos_and_fills_the_rest():
    model = by_position({1: peaked(5, 0.99), 2: peaked(EOS, 0.99), 3: peaked(6, 0.99)}, default=UNIFORM)
    out = generate(model, SPEC, [[1]], WeDLMConfig(max_new_tokens=6, window_size=4))
    assert out.output_ids == [[5, EOS, PAD, PAD, PAD, PAD]]  # 6 was filled after EOS but never committed
    assert out.nfe == 2


def test_window_never_reaches_past_the_generation_limit():
    model = by_position({}, default=peaked(3, 0.99))
    out = generate(model, SPEC, [[1, 2]], WeDLMConfig(max_new_tokens=3, window_size=16))
    assert max(int(call.position_ids.max()) for call in model.calls) == 4
    assert out.output_ids == [[3, 3, 3]]


# --- batching, randomness, NFE -----------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        WeDLMConfig(max_new_tokens=10, window_size=4),
        WeDLMConfig(max_new_tokens=10, window_size=5, entropy_threshold=1.5, temperature=0.7),
        WeDLMConfig(max_new_tokens=9, window_size=3, entropy_threshold=None, temperature=1.0, top_k=5, top_p=0.9),
    ],
)
def test_batch_equals_single(config):
    model = TinyDenoiser(SPEC, seed=8)
    assert_batch_equals_single(generate, model, SPEC, config)


def test_rows_finishing_early_do_not_perturb_the_others():
    model = TinyDenoiser(SPEC, seed=8)
    fields = dict(max_new_tokens=10, window_size=4, entropy_threshold=1.5, temperature=0.7)
    alone = generate(model, SPEC, PROMPTS[:1], WeDLMConfig(**fields, stop_token_ids=()), seed=2).output_ids[0]
    stop = alone[3]  # a token row 0 commits mid-way becomes its stop token
    stopping = WeDLMConfig(**fields, stop_token_ids=(stop,))
    batched = assert_batch_equals_single(generate, model, SPEC, stopping, seed=2)
    cut = alone.index(stop) + 1
    assert batched.output_ids[0] == alone[:cut] + [PAD] * (10 - cut)


def test_on_step_reports_committed_tokens():
    seen: list[tuple[int, int]] = []
    model = by_position({}, default=peaked(3, 0.99))
    generate(model, SPEC, [[1], [2]], WeDLMConfig(max_new_tokens=2, window_size=2), on_step=lambda *a: seen.append(a))
    assert seen == [(1, 0), (2, 4)]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(window_size=0), "window_size=0"),
        (dict(entropy_threshold=0.0), "entropy_threshold"),
        (dict(pos_penalty=-1.0), "pos_penalty"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_config_rejects_impossible_settings(fields, message):
    with pytest.raises(DlmcError, match=message):
        WeDLMConfig(**fields)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (toy_spec(), "causal model"),
        (toy_spec(attention="causal", shift_logits=True), "shift_logits"),
        (toy_spec(attention="causal", max_length=8), "max_length=8"),
    ],
)
def test_generate_rejects_models_it_cannot_drive(spec, message):
    with pytest.raises(DlmcError, match=message):
        generate(TinyDenoiser(SPEC), spec, [[1, 2]], WeDLMConfig(max_new_tokens=8))
