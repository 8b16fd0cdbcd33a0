import pytest
import torch

from dlmc.decoding.block import BlockConfig, generate
from dlmc.errors import DlmcError
from tests.decoding.conftest import (
    EOS,
    MASK,
    PAD,
    ScriptedModel,
    TinyDenoiser,
    assert_batch_equals_single,
    by_position,
    peaked,
    toy_spec,
)

SDAR = toy_spec(attention="block_causal", block_size=4)
FAST_DLLM_V2 = toy_spec(attention="block_causal", block_size=4, shift_logits=True)


def token_for(q: int) -> int:
    return q % 7 + 1


def confident_model(p: float = 0.95) -> ScriptedModel:
    return by_position({q: peaked(token_for(q), p) for q in range(64)})


def lengths(model: ScriptedModel) -> list[int]:
    return [call.input_ids.shape[1] for call in model.calls]


def decided(model: ScriptedModel, start: int) -> list[set[int]]:
    return [{q for q in range(start, call.input_ids.shape[1]) if call.input_ids[0, q] != MASK} for call in model.calls]


# --- block alignment and the AR step ----------------------------------------------------------


def test_blocks_sit_at_multiples_of_the_block_size():
    model = confident_model()
    config = BlockConfig(gen_length=6, remasking="low_confidence_static")  # one token per step
    out = generate(model, SDAR, [[1, 2, 3, 4, 5]], config)
    # block [4, 8) keeps prompt token 4 and decodes 5..7; block [8, 12) covers positions 8..10 (and 11)
    assert lengths(model) == [8, 8, 8, 12, 12, 12, 12]
    assert out.nfe == 7
    assert out.output_ids == [[token_for(q) for q in range(5, 11)]]
    assert model.calls[0].input_ids[0].tolist() == [1, 2, 3, 4, 5, MASK, MASK, MASK]
    assert model.calls[0].position_ids[0].tolist() == list(range(8))


def test_shifted_model_takes_an_ar_step_after_a_block_aligned_prompt_and_after_each_block():
    model = confident_model()
    out = generate(model, FAST_DLLM_V2, [[1, 2, 3, 4]], BlockConfig(gen_length=6, threshold=1.0))
    # AR over the prompt -> token 4; block [4, 8): 5, 6, 7 one per step; AR over it -> token 8;
    # block [8, 12): 9, 10, 11
    assert lengths(model) == [4, 8, 8, 8, 8, 12, 12, 12]
    assert out.output_ids == [[token_for(q - 1) for q in range(4, 10)]]
    assert model.calls[1].input_ids[0].tolist() == [1, 2, 3, 4, token_for(3), MASK, MASK, MASK]


def test_shifted_model_without_aligned_prompt_opens_the_partial_block():
    model = confident_model()
    out = generate(model, FAST_DLLM_V2, [[1, 2, 3, 4, 5]], BlockConfig(gen_length=3, threshold=1.0))
    assert lengths(model) == [8, 8, 8]
    assert out.output_ids == [[token_for(q - 1) for q in range(5, 8)]]


def test_ar_step_is_greedy_even_when_sampling():
    model = by_position({3: peaked(6, 0.6)})
    out = generate(model, FAST_DLLM_V2, [[1, 2, 3, 4]], BlockConfig(gen_length=1, temperature=5.0), seed=3)
    assert out.output_ids == [[6]]
    assert out.nfe == 1


# --- remasking rules ---------------------------------------------------------------------------


def test_threshold_rule_works_sub_block_by_sub_block():
    # position 7 is the most confident, but sub-block [4, 6) is decoded first
    rows = {4: peaked(1, 0.5), 5: peaked(2, 0.6), 6: peaked(3, 0.7), 7: peaked(4, 0.99)}
    model = by_position(rows)
    generate(model, SDAR, [[1, 2, 3, 4]], BlockConfig(gen_length=4, sub_block_length=2))
    # [4, 6): 5 (arg-max), then 4; [6, 8): 7 (0.99 > 0.9), then 6
    assert decided(model, 4) == [set(), {5}, {4, 5}, {4, 5, 7}]
    model = by_position(rows)
    generate(model, SDAR, [[1, 2, 3, 4]], BlockConfig(gen_length=4))
    assert decided(model, 4) == [set(), {7}, {6, 7}, {5, 6, 7}]


def test_threshold_rule_is_strict():
    model = by_position({q: peaked(1, 0.5) for q in range(4, 8)})
    generate(model, SDAR, [[1, 2, 3, 4]], BlockConfig(gen_length=4, threshold=0.5))
    assert len(model.calls) == 4  # 0.5 is not above 0.5: one arg-max per step


@pytest.mark.parametrize(("remasking", "first_step"), [("low_confidence_static", 2), ("low_confidence_dynamic", 3)])
def test_sdar_rules(remasking, first_step):
    rows = {4: peaked(1, 0.95), 5: peaked(2, 0.96), 6: peaked(3, 0.97), 7: peaked(4, 0.5)}
    model = by_position(rows)
    config = BlockConfig(gen_length=4, remasking=remasking, denoising_steps=2, threshold=0.9)
    out = generate(model, SDAR, [[1, 2, 3, 4]], config)
    assert len(decided(model, 4)[1]) == first_step  # schedule [2, 2]; dynamic takes all 3 confident ones
    assert out.nfe == 2
    assert out.output_ids == [[1, 2, 3, 4]]


def test_sdar_schedule_never_asks_for_more_than_the_masks_left():
    # one step per block asks for 4 tokens, but block [4, 8) holds only 3 masks after prompt token 4
    model = confident_model(0.5)
    config = BlockConfig(gen_length=7, remasking="low_confidence_static", denoising_steps=1)
    out = generate(model, SDAR, [[1, 2, 3, 4, 5]], config)
    assert out.nfe == 2
    assert model.calls[1].input_ids[0, :5].tolist() == [1, 2, 3, 4, 5]


# --- stopping ----------------------------------------------------------------------------------


def eos_model(eos_confidence: float, other: float) -> ScriptedModel:
    rows = {4: peaked(1, other), 5: peaked(EOS, eos_confidence), 6: peaked(2, other - 0.1), 7: peaked(3, other - 0.2)}
    return by_position(rows, default=peaked(4, 0.99))


def test_threshold_rule_stops_once_nothing_before_eos_is_masked():
    model = eos_model(0.95, 0.4)
    out = generate(model, SDAR, [[1, 2, 3, 4]], BlockConfig(gen_length=8))
    # step 1 commits EOS (5) alone; step 2 commits position 4; then nothing before EOS is masked
    assert out.nfe == 2
    assert out.output_ids == [[1, EOS, PAD, PAD, PAD, PAD, PAD, PAD]]


def test_sdar_rule_stops_after_the_block_holding_eos():
    model = eos_model(0.95, 0.4)
    out = generate(model, SDAR, [[1, 2, 3, 4]], BlockConfig(gen_length=8, remasking="low_confidence_dynamic"))
    assert out.nfe == 4
    assert out.output_ids == [[1, EOS, 2, 3, PAD, PAD, PAD, PAD]]  # tokens after EOS kept as produced


def test_stop_tokens_can_be_configured():
    out = generate(eos_model(0.95, 0.99), SDAR, [[1, 2, 3, 4]], BlockConfig(gen_length=8, stop_token_ids=()))
    assert out.output_ids == [[1, EOS, 2, 3, 4, 4, 4, 4]]


# --- batching, randomness, NFE -----------------------------------------------------------------


@pytest.mark.parametrize("spec", [SDAR, FAST_DLLM_V2], ids=["same_position", "shifted"])
@pytest.mark.parametrize(
    "config",
    [
        BlockConfig(gen_length=10, threshold=0.3),
        BlockConfig(gen_length=10, threshold=0.2, sub_block_length=2, temperature=0.8, top_p=0.9),
        BlockConfig(gen_length=9, remasking="low_confidence_static", denoising_steps=2, temperature=0.7, top_k=6),
        BlockConfig(gen_length=9, remasking="low_confidence_dynamic", threshold=0.3, temperature=1.0, top_p=0.8),
    ],
)
def test_batch_equals_single(spec, config):
    model = TinyDenoiser(spec, seed=5)
    batched = assert_batch_equals_single(generate, model, spec, config)
    assert all(len(ids) == config.gen_length for ids in batched.output_ids)


def test_batch_rows_stop_independently():
    spec = SDAR
    model = TinyDenoiser(spec, seed=6)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 1, 2], [3, 3]]
    alone = generate(model, spec, prompts[:1], BlockConfig(gen_length=12, stop_token_ids=()), seed=1).output_ids[0]
    stop = alone[5]  # a token row 0 produces mid-way becomes its stop token
    config = BlockConfig(gen_length=12, stop_token_ids=(stop,))
    batched = assert_batch_equals_single(generate, model, spec, config, seed=1, prompts=prompts)
    cut = alone.index(stop) + 1
    assert batched.output_ids[0][:cut] == alone[:cut]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, config, at", [
    (FAST_DLLM_V2, BlockConfig(gen_length=8, threshold=0.5), 7),  # shifted: position 7 reads row 6
    (SDAR, BlockConfig(gen_length=8, remasking="low_confidence_static"), 6),
])
def test_a_model_that_predicts_the_mask_token_is_one_line_not_a_hang(spec, config, at):
    """Committing the mask token leaves the position masked; at temperature 0 the step would repeat."""
    model = by_position({q: peaked(token_for(q), 0.9) for q in range(6)}, default=peaked(MASK, 0.9))
    with pytest.raises(DlmcError, match=f"block: the model predicts the mask token itself at position {at} "):
        generate(model, spec, [[1, 2, 3, 4, 5]], config)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(gen_length=0), "gen_length=0"),
        (dict(remasking="random"), "remasking='random'"),
        (dict(threshold=0.0), "threshold"),
        (dict(remasking="low_confidence_static", sub_block_length=2), "sub_block_length"),
        (dict(denoising_steps=2), "denoising_steps"),
        (dict(top_k=5), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(remasking="low_confidence_static", denoising_steps=0), "denoising_steps=0"),
    ],
)
def test_config_rejects_impossible_settings(fields, message):
    with pytest.raises(DlmcError, match=message):
        BlockConfig(**fields)


@pytest.mark.parametrize(
    ("spec", "config", "message"),
    [
        (toy_spec(), BlockConfig(gen_length=4), "block-causal"),
        (SDAR, BlockConfig(gen_length=4, block_length=8), "block_length=8 differs"),
        (SDAR, BlockConfig(gen_length=4, sub_block_length=3), "not a multiple of sub_block_length=3"),
        (toy_spec(attention="block_causal", block_size=4, max_length=9), BlockConfig(gen_length=7), "= 12 tokens"),
    ],
)
def test_generate_rejects_settings_the_model_cannot_meet(spec, config, message):
    with pytest.raises(DlmcError, match=message):
        generate(TinyDenoiser(SDAR), spec, [[1, 2]], config)


def test_ids_are_int64_on_the_model_device():
    model = confident_model()
    generate(model, SDAR, [[1, 2]], BlockConfig(gen_length=2))
    assert model.calls[0].input_ids.dtype == torch.int64
