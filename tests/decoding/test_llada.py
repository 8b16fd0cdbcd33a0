import dataclasses

import pytest
import torch

from dlmc.decoding.llada import LLaDAConfig, factor_accept_count, generate
from dlmc.errors import DlmcError
from tests.decoding.conftest import (
    EOS,
    EOT,
    MASK,
    PAD,
    PROMPTS,
    ScriptedModel,
    TinyDenoiser,
    assert_batch_equals_single,
    by_position,
    peaked,
    toy_spec,
)

SPEC = toy_spec()


def committed_after_each_call(model: ScriptedModel, start: int) -> list[set[int]]:
    """For every call, the generated positions (>= start) already decided in its input."""
    return [{q for q in range(start, call.input_ids.shape[1]) if call.input_ids[0, q] != MASK} for call in model.calls]


# --- hand-worked cases ------------------------------------------------------------------------


def test_low_confidence_commits_best_first_inside_each_block():
    # prompt at 0..1, gen 2..5 in two blocks; position 5 is the most confident but sits in block 1
    model = by_position({2: peaked(3, 0.6), 3: peaked(4, 0.8), 4: peaked(5, 0.7), 5: peaked(6, 0.99)})
    config = LLaDAConfig(gen_length=4, block_length=2, steps=4)
    out = generate(model, SPEC, [[1, 2]], config)
    assert out.output_ids == [[3, 4, 5, 6]]
    assert out.nfe == 4
    assert committed_after_each_call(model, 2) == [set(), {3}, {2, 3}, {2, 3, 5}]


def test_one_block_commits_by_confidence_over_the_whole_canvas():
    model = by_position({2: peaked(3, 0.6), 3: peaked(4, 0.8), 4: peaked(5, 0.7), 5: peaked(6, 0.99)})
    generate(model, SPEC, [[1, 2]], LLaDAConfig(gen_length=4, block_length=4, steps=4))
    assert committed_after_each_call(model, 2) == [set(), {5}, {3, 5}, {3, 4, 5}]


def test_fewer_steps_commit_several_tokens_per_step():
    model = by_position({2: peaked(3, 0.6), 3: peaked(4, 0.8), 4: peaked(5, 0.7), 5: peaked(6, 0.99)})
    out = generate(model, SPEC, [[1, 2]], LLaDAConfig(gen_length=4, block_length=4, steps=2))
    assert out.nfe == 2
    assert committed_after_each_call(model, 2) == [set(), {3, 5}]


def test_threshold_commits_all_confident_tokens_and_at_least_one():
    model = by_position({2: peaked(3, 0.95), 3: peaked(4, 0.5), 4: peaked(5, 0.95), 5: peaked(6, 0.92)})
    config = LLaDAConfig(gen_length=4, block_length=2, steps=4, threshold=0.9)
    out = generate(model, SPEC, [[1, 2]], config)
    assert out.output_ids == [[3, 4, 5, 6]]
    assert out.nfe == 3  # block 0: 0.95 then the 0.5 alone; block 1: both in one step
    assert committed_after_each_call(model, 2) == [set(), {2}, {2, 3}]


@pytest.mark.parametrize(
    ("ranked", "expected"),
    [
        ([0.3], 1),
        ([0.9, 0.5, 0.1, 0.1], 1),  # the 2nd must reach 1 - 1/3
        ([0.99, 0.9, 0.1, 0.1, 0.1], 2),  # the 3rd must reach 1 - 1/4
        ([0.9, 0.8, 0.1], 3),  # official off-by-one: failing at the last candidate accepts all
        ([0.9, 0.8, 0.8, 0.1], 4),
        ([0.99, 0.95, 0.9], 3),
    ],
)
def test_factor_rule_accept_count(ranked, expected):
    assert factor_accept_count(torch.tensor(ranked, dtype=torch.float64), factor=1.0) == expected


def test_factor_rule_end_to_end():
    model = by_position({2: peaked(3, 0.95), 3: peaked(4, 0.9), 4: peaked(5, 0.6), 5: peaked(6, 0.5)})
    out = generate(model, SPEC, [[1, 2]], LLaDAConfig(gen_length=4, block_length=2, steps=2, factor=1.0))
    # block 0: [0.95, 0.9] -> 0.9 >= 1 - 1/3, both; block 1: [0.6, 0.5] fails at the last index -> both
    assert out.nfe == 2
    assert out.output_ids == [[3, 4, 5, 6]]


def test_cfg_combines_conditional_and_unconditional_logits():
    def fn(ids, pos):
        logits = torch.zeros(len(ids), 12, dtype=torch.float64)
        unconditional = bool(ids[0] == MASK)
        logits[:, 3] = 2.0
        logits[:, 4] = 0.0 if unconditional else 1.5
        return logits

    plain = generate(ScriptedModel(fn), SPEC, [[1, 2]], LLaDAConfig(gen_length=2, block_length=2, steps=2))
    assert plain.output_ids == [[3, 3]]
    model = ScriptedModel(fn)
    guided = generate(model, SPEC, [[1, 2]], LLaDAConfig(gen_length=2, block_length=2, steps=2, cfg_scale=1.0))
    # token 4: 0 + 2 * (1.5 - 0) = 3 beats token 3: 2 + 2 * (2 - 2) = 2
    assert guided.output_ids == [[4, 4]]
    assert guided.nfe == 4
    conditional, unconditional = model.calls[0].input_ids.tolist()
    assert conditional == [1, 2, MASK, MASK]
    assert unconditional == [MASK, MASK, MASK, MASK]


def test_logits_eos_inf_forbids_eos():
    model = by_position({}, default=peaked(EOS, 0.9))
    assert generate(model, SPEC, [[1]], LLaDAConfig(gen_length=2, block_length=2, steps=2)).output_ids == [[EOS, EOS]]
    banned = generate(model, SPEC, [[1]], LLaDAConfig(gen_length=2, block_length=2, steps=2, logits_eos_inf=True))
    assert EOS not in banned.output_ids[0]


@pytest.mark.parametrize("special", [EOT, EOS])
def test_confidence_eos_eot_inf_at_zero_temperature_defers_both(special):
    rows = {1: peaked(special, 0.99), 2: peaked(4, 0.6)}
    config = LLaDAConfig(gen_length=2, block_length=2, steps=2)
    model = by_position(rows)
    generate(model, SPEC, [[1]], config)
    assert committed_after_each_call(model, 1) == [set(), {1}]
    model = by_position(rows)
    out = generate(model, SPEC, [[1]], LLaDAConfig(gen_length=2, block_length=2, steps=2, confidence_eos_eot_inf=True))
    assert committed_after_each_call(model, 1) == [set(), {2}]
    assert out.output_ids == [[special, 4]]


def test_confidence_eos_eot_inf_at_positive_temperature_defers_only_eot():
    # the official code writes EOS into the noisy logits, which above T = 0 are a separate tensor
    rows = {1: peaked(EOS, 0.999), 2: peaked(EOT, 0.999), 3: peaked(4, 0.6)}
    config = LLaDAConfig(gen_length=3, block_length=3, steps=3, temperature=0.01, confidence_eos_eot_inf=True)
    model = by_position(rows)
    out = generate(model, SPEC, [[1]], config)
    assert out.output_ids == [[EOS, EOT, 4]]
    assert committed_after_each_call(model, 1) == [set(), {1}, {1, 3}]


# --- batching, randomness, NFE -----------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        LLaDAConfig(gen_length=8, block_length=4, steps=8),
        LLaDAConfig(gen_length=8, block_length=4, steps=4, temperature=0.8),
        LLaDAConfig(gen_length=8, block_length=8, steps=8, temperature=0.5, remasking="random"),
        LLaDAConfig(gen_length=8, block_length=4, steps=8, temperature=0.3, cfg_scale=0.5),
        LLaDAConfig(gen_length=8, block_length=4, steps=8, threshold=0.3, temperature=0.4),
        LLaDAConfig(gen_length=8, block_length=2, steps=8, factor=1.5),
        LLaDAConfig(gen_length=8, block_length=4, steps=8, temperature=1.0, confidence_eos_eot_inf=True),
    ],
)
def test_batch_equals_single(config):
    model = TinyDenoiser(SPEC, seed=1)
    assert_batch_equals_single(generate, model, SPEC, config)


def official_llada(model, prompt: list[int], config: LLaDAConfig, seed: int) -> list[int]:
    """The official single-prompt loop written out with the global RNG, as a cross-check."""
    torch.manual_seed(seed)
    x = torch.tensor([prompt + [MASK] * config.gen_length])
    steps = config.steps_per_block
    for b in range(config.num_blocks):
        end = len(prompt) + (b + 1) * config.block_length
        n = config.block_length
        schedule = [n // steps + (1 if i < n % steps else 0) for i in range(steps)]
        for i in range(steps):
            masked = x == MASK
            logits = model(x, None, None)
            noisy = logits
            if config.temperature > 0:
                logits64 = logits.to(torch.float64)
                noise = torch.rand_like(logits64, dtype=torch.float64)
                noisy = logits64.exp() / (-torch.log(noise)) ** config.temperature
            x0 = noisy.argmax(-1)
            if config.remasking == "low_confidence":
                p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            else:
                p = torch.rand(x0.shape)
            p[:, end:] = float("-inf")
            confidence = torch.where(masked, p, float("-inf"))
            chosen = torch.topk(confidence[0], schedule[i]).indices
            x[0, chosen] = x0[0, chosen]
    return x[0, len(prompt) :].tolist()


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_single_prompt_replays_the_official_loop_with_the_global_seed(remasking):
    model = TinyDenoiser(SPEC, seed=2)
    config = LLaDAConfig(gen_length=8, block_length=4, steps=4, temperature=0.9, remasking=remasking)
    for prompt in PROMPTS:
        assert generate(model, SPEC, [prompt], config, seed=5).output_ids[0] == official_llada(model, prompt, config, 5)


def test_nfe_and_on_step():
    model = TinyDenoiser(SPEC)
    seen: list[tuple[int, int]] = []
    config = LLaDAConfig(gen_length=4, block_length=2, steps=4)
    out = generate(model, SPEC, PROMPTS[:2], config, on_step=lambda *a: seen.append(a))
    assert out.nfe == model.calls == 4
    assert seen == [(1, 2), (2, 4), (3, 6), (4, 8)]  # (nfe, decided tokens over both prompts)
    guided_config = LLaDAConfig(gen_length=4, block_length=2, steps=4, cfg_scale=1.0)
    guided = generate(TinyDenoiser(SPEC), SPEC, PROMPTS[:2], guided_config)
    assert guided.nfe == 8


# --- stop at EOS -------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [EOS, EOT])
def test_stop_at_eos_ends_the_row_at_the_end_of_the_block_that_settles_it(stop):
    # gen positions 2..7 in blocks of 2; the stop token at 3 is the most confident, so it is committed
    # first, but the row stops only once its block (position 2 too) is full: 2 steps instead of 6
    rows = {2: peaked(3, 0.6), 3: peaked(stop, 0.99), 4: peaked(5, 0.7), 5: peaked(6, 0.8)}
    config = LLaDAConfig(gen_length=6, block_length=2, steps=6, stop_at_eos=True)
    model = by_position(rows)
    out = generate(model, SPEC, [[1, 2]], config)
    assert committed_after_each_call(model, 2) == [set(), {3}]
    assert (out.nfe, out.row_nfe) == (2, [2])
    full = generate(by_position(rows), SPEC, [[1, 2]], LLaDAConfig(gen_length=6, block_length=2, steps=6))
    assert full.nfe == 6 and full.output_ids[0][:2] == [3, stop]
    assert out.output_ids == [[3, stop, PAD, PAD, PAD, PAD]]  # never decided: the fill id


def test_stop_at_eos_runs_every_block_up_to_the_one_holding_the_stop():
    # the stop token sits in block 1 (position 4): blocks 0 and 1 run, block 2 is skipped
    rows = {2: peaked(3, 0.6), 3: peaked(4, 0.9), 4: peaked(EOS, 0.99), 5: peaked(6, 0.8)}
    out = generate(by_position(rows), SPEC, [[1, 2]], LLaDAConfig(gen_length=6, block_length=2, stop_at_eos=True))
    assert out.nfe == 4 and out.output_ids == [[3, 4, EOS, 6, PAD, PAD]]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_stop_at_eos_keeps_the_full_decode_up_to_the_stop_and_batch_equals_single(temperature, threshold):
    model = TinyDenoiser(SPEC, seed=0)  # its rows stop after 2, 3 and 1 of 4 blocks: they leave the batch apart
    config = LLaDAConfig(gen_length=16, block_length=4, temperature=temperature, threshold=threshold)
    stopping = dataclasses.replace(config, stop_at_eos=True)
    full = generate(model, SPEC, PROMPTS, config, seed=7)
    out = assert_batch_equals_single(generate, model, SPEC, stopping, seed=7)
    assert out.row_nfe != full.row_nfe and out.nfe < full.nfe
    for row, stopped, full_row, nfe, full_nfe in zip(PROMPTS, out.output_ids, full.output_ids, out.row_nfe,
                                                     full.row_nfe, strict=True):
        cut = next((i for i, t in enumerate(full_row) if t in (EOS, EOT)), None)
        assert cut is not None, row  # every row of this model says a stop token in 16 tokens
        assert stopped[: cut + 1] == full_row[: cut + 1]
        assert nfe <= full_nfe


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(gen_length=32, block_length=64, steps=32), "block_length=64 is larger than gen_length=32"),
        (dict(gen_length=96, block_length=64, steps=32), "not a multiple of block_length"),
        (dict(gen_length=96, block_length=32, steps=100), r"steps=100 is not divisible by the number of blocks \(3\)"),
        (dict(steps=0), "steps=0"),
        (dict(temperature=-1.0), "temperature"),
        (dict(cfg_scale=-0.5), "cfg_scale"),
        (dict(remasking="entropy"), "remasking='entropy'"),
        (dict(threshold=0.9, factor=1.0), "exclusive"),
        (dict(threshold=1.5), r"threshold=1.5 must lie in \(0, 1\]"),
        (dict(threshold=0.0), "threshold=0.0"),
        (dict(factor=0.0), "factor=0.0"),
    ],
)
def test_config_rejects_impossible_settings(fields, message):
    with pytest.raises(DlmcError, match=message):
        LLaDAConfig(**fields)


@pytest.mark.parametrize(
    ("spec", "config", "message"),
    [
        (toy_spec(max_length=16), LLaDAConfig(gen_length=16, block_length=16, steps=16), "exceeds spec.max_length=16"),
        (toy_spec(eos_token_id=None), LLaDAConfig(gen_length=4, block_length=4, steps=4, logits_eos_inf=True), "eos"),
        (
            toy_spec(eot_token_id=None),
            LLaDAConfig(gen_length=4, block_length=4, steps=4, confidence_eos_eot_inf=True),
            "eot_token_id",
        ),
        (toy_spec(pad_token_id=MASK), LLaDAConfig(gen_length=4, block_length=4, steps=4), "pad_token_id"),
        (toy_spec(eos_token_id=None, eot_token_id=None), LLaDAConfig(gen_length=4, stop_at_eos=True),
         "stop_at_eos needs spec.eos_token_id or spec.eot_token_id"),
    ],
)
def test_generate_rejects_settings_the_model_cannot_meet(spec, config, message):
    with pytest.raises(DlmcError, match=message):
        generate(TinyDenoiser(toy_spec()), spec, [[1, 2]], config)
