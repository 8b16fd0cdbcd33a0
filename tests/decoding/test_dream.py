import dataclasses

import pytest
import torch

from dlmc.decoding.common import top_k_filter, top_p_filter
from dlmc.decoding.dream import DreamConfig, generate
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

SPEC = toy_spec(shift_logits=True)


def masks_per_call(model: ScriptedModel) -> list[int]:
    return [int((call.input_ids[0] == MASK).sum()) for call in model.calls]


def decided_per_call(model: ScriptedModel, start: int) -> list[set[int]]:
    return [{q for q in range(start, call.input_ids.shape[1]) if call.input_ids[0, q] != MASK} for call in model.calls]


def token_for_row(q: int) -> int:
    return q % 5 + 1


def shifted_model() -> ScriptedModel:
    """Row q points at token_for_row(q): with the shift, position q + 1 receives it."""
    return by_position({q: peaked(token_for_row(q), 0.9) for q in range(32)})


# --- hand-worked cases ------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold"])
def test_position_i_reads_row_i_minus_one(alg):
    model = shifted_model()
    out = generate(model, SPEC, [[1, 2, 3]], DreamConfig(max_new_tokens=6, steps=6, alg=alg))
    assert out.output_ids == [[token_for_row(q - 1) for q in range(3, 9)]]


def test_same_position_model_reads_row_i():
    model = shifted_model()
    out = generate(model, toy_spec(), [[1, 2, 3]], DreamConfig(max_new_tokens=4, steps=4, alg="maskgit_plus"))
    assert out.output_ids == [[token_for_row(q) for q in range(3, 7)]]


def test_ranked_count_follows_the_timestep_schedule():
    model = shifted_model()
    out = generate(model, SPEC, [[1, 2]], DreamConfig(max_new_tokens=8, steps=4, alg="maskgit_plus"))
    # t = linspace(1, 1e-3, 5): int(8 * (1 - .75025)) = 1, int(7 * (1 - .5005 / .75025)) = 2,
    # int(5 * (1 - .25075 / .5005)) = 2, then all 3 remaining
    assert masks_per_call(model) == [8, 7, 5, 3]
    assert out.nfe == 4


def test_origin_runs_every_step_even_when_done_early():
    model = shifted_model()
    out = generate(model, SPEC, [[1, 2]], DreamConfig(max_new_tokens=2, steps=5))
    assert out.nfe == 5
    assert out.output_ids == [[token_for_row(1), token_for_row(2)]]  # the last step flips every mask


def distribution(**probs: float) -> torch.Tensor:
    """Logits [V] of a distribution given as t<id>=p; unnamed tokens share the rest evenly."""
    named = {int(k[1:]): v for k, v in probs.items()}
    rest = (1 - sum(named.values())) / (12 - len(named))
    p = torch.tensor([named.get(i, rest) for i in range(12)], dtype=torch.float64)
    return p.clamp(min=1e-30).log()


THREE_WAY = distribution(t1=0.34, t2=0.33, t3=0.33)  # top1 0.34, margin 0.01, entropy ln 3 ~ 1.10
TWO_WAY = distribution(t1=0.6, t2=0.4)  # top1 0.60, margin 0.20, entropy ~ 0.67
WIDE = distribution(t4=0.45)  # top1 0.45, margin 0.40, entropy ~ 2.0


@pytest.mark.parametrize(
    ("row", "alg", "first"),
    [
        (THREE_WAY, "maskgit_plus", 4),
        (THREE_WAY, "topk_margin", 4),
        (THREE_WAY, "entropy", 3),
        (TWO_WAY, "maskgit_plus", 3),
        (TWO_WAY, "topk_margin", 4),
        (TWO_WAY, "entropy", 3),
    ],
)
def test_scores_order_the_commits(row, alg, first):
    # positions 3 and 4 read rows 2 and 3; later positions read uniform rows and always rank last
    model = by_position({2: row, 3: WIDE}, default=torch.zeros(12, dtype=torch.float64))
    generate(model, SPEC, [[1, 2, 3]], DreamConfig(max_new_tokens=4, steps=2, alg=alg))
    assert decided_per_call(model, 3)[1] == {first}


def test_confidence_threshold_carries_quota_and_extends_the_last_step():
    # gen positions 2..5 read rows 1..4 with confidences 0.95, 0.6, 0.5, 0.4; quota 2 per step
    model = by_position({1: peaked(3, 0.95), 2: peaked(4, 0.6), 3: peaked(5, 0.5), 4: peaked(6, 0.4)})
    out = generate(model, SPEC, [[1, 2]], DreamConfig(max_new_tokens=4, steps=2, alg="confidence_threshold"))
    # step 1: {0.95, 0.6} -> 0.95 only, carry 1; step 2 (last): 3 candidates -> 0.6 only, extend;
    # step 3: 2 candidates -> 0.5 only, extend; step 4: the 0.4
    assert decided_per_call(model, 2) == [set(), {2}, {2, 3}, {2, 3, 4}]
    assert out.nfe == 4
    assert out.output_ids == [[3, 4, 5, 6]]


def test_confidence_threshold_commits_everything_confident_in_one_step():
    model = by_position({q: peaked(3, 0.95) for q in range(8)})
    out = generate(model, SPEC, [[1, 2]], DreamConfig(max_new_tokens=4, steps=2, alg="confidence_threshold"))
    assert out.nfe == 2  # the quota (2 per step) caps what one step commits


# --- batching, randomness, NFE -----------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        DreamConfig(max_new_tokens=8, steps=8, temperature=0.7, top_p=0.9),
        DreamConfig(max_new_tokens=8, steps=4, alg="maskgit_plus", temperature=0.5, top_k=5),
        DreamConfig(max_new_tokens=8, steps=8, alg="entropy", alg_temp=0.3),
        DreamConfig(max_new_tokens=8, steps=6, alg="topk_margin", temperature=1.0, alg_temp=0.5),
        DreamConfig(max_new_tokens=8, steps=4, alg="confidence_threshold", threshold=0.4, temperature=0.6),
    ],
)
def test_batch_equals_single(config):
    model = TinyDenoiser(SPEC, seed=3)
    assert_batch_equals_single(generate, model, SPEC, config)


def official_dream(model, prompt: list[int], config: DreamConfig, seed: int) -> list[int]:
    """The official single-prompt `_sample` loop written out with the global RNG, as a cross-check."""
    torch.manual_seed(seed)
    x = torch.tensor([prompt + [MASK] * config.max_new_tokens])
    timesteps = torch.linspace(1, config.eps, config.steps + 1)

    def sample(logits):
        if config.temperature > 0:
            logits = logits / config.temperature
        if config.top_p is not None and config.top_p < 1:
            logits = top_p_filter(logits, config.top_p, torch.finfo(logits.dtype).min)
        if config.top_k is not None:
            logits = top_k_filter(logits, config.top_k, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, -1)
        if config.temperature > 0:
            x0 = torch.distributions.Categorical(probs=probs).sample()
            return probs.gather(-1, x0[:, None])[:, 0], x0
        return probs.max(-1)

    for i in range(config.steps):
        masked = x == MASK
        logits = model(x, None, None)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[masked]
        t, s = timesteps[i], timesteps[i + 1]
        if config.alg == "origin":
            p_transfer = 1 - s / t if i < config.steps - 1 else 1
            x0 = torch.zeros_like(x[masked]) + MASK
            flips = torch.rand(*x0.shape) < p_transfer
            _, x0[flips] = sample(mask_logits[flips])
            x[masked] = x0
            continue
        confidence, x0 = sample(mask_logits)
        n_masked = masked.sum() / masked.shape[0]
        n = int(n_masked * (1 - s / t)) if i < config.steps - 1 else int(n_masked)
        full = torch.full_like(x, float("-inf"), dtype=logits.dtype)
        full[masked] = confidence
        if n > 0:
            if config.alg_temp:
                chosen = torch.multinomial(torch.softmax(full / config.alg_temp, -1), num_samples=n)
            else:
                chosen = torch.topk(full, n).indices
            candidates = torch.zeros_like(x) + MASK
            candidates[masked] = x0
            x[0, chosen[0]] = candidates[0, chosen[0]]
    return x[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "config",
    [
        DreamConfig(max_new_tokens=8, steps=8, temperature=0.8, top_p=0.95),
        DreamConfig(max_new_tokens=8, steps=4, alg="maskgit_plus", temperature=0.6, top_k=4, alg_temp=0.4),
    ],
)
def test_single_prompt_replays_the_official_loop_with_the_global_seed(config):
    model = TinyDenoiser(SPEC, seed=4)
    for prompt in PROMPTS:
        assert generate(model, SPEC, [prompt], config, seed=9).output_ids[0] == official_dream(model, prompt, config, 9)


def test_nfe_counts_model_calls():
    model = TinyDenoiser(SPEC)
    out = generate(model, SPEC, PROMPTS, DreamConfig(max_new_tokens=6, steps=3, alg="entropy"))
    assert out.nfe == model.calls == 3
    assert all(len(ids) == 6 and MASK not in ids for ids in out.output_ids)


# --- stop at EOS -------------------------------------------------------------------------------


def test_stop_at_eos_ends_the_row_once_everything_up_to_the_stop_is_decided():
    # gen positions 2..7 read rows 1..6; quota 1 per step. Step 1 commits the EOS at position 3 (0.99),
    # which does not stop the row: position 2 is still masked. Step 2 commits it (0.95): stop.
    rows = {1: peaked(3, 0.95), 2: peaked(EOS, 0.99), 3: peaked(5, 0.5), 4: peaked(6, 0.5)}
    config = DreamConfig(max_new_tokens=6, steps=6, alg="confidence_threshold")
    model = by_position(rows)
    out = generate(model, SPEC, [[1, 2]], dataclasses.replace(config, stop_at_eos=True))
    assert decided_per_call(model, 2) == [set(), {3}]
    assert (out.nfe, out.row_nfe) == (2, [2])
    assert out.output_ids == [[3, EOS, PAD, PAD, PAD, PAD]]
    full = generate(by_position(rows), SPEC, [[1, 2]], config)
    assert full.nfe == 6 and full.output_ids[0][:2] == [3, EOS]


@pytest.mark.parametrize(
    ("alg", "temperature"), [("maskgit_plus", 0.0), ("origin", 0.8), ("confidence_threshold", 0.0)]
)
def test_stop_at_eos_keeps_the_full_decode_up_to_the_stop_and_batch_equals_single(alg, temperature):
    model = TinyDenoiser(SPEC, seed=0)  # its rows say a stop token early, each at a different step
    config = DreamConfig(max_new_tokens=16, steps=16, alg=alg, temperature=temperature)
    full = generate(model, SPEC, PROMPTS, config, seed=7)
    out = assert_batch_equals_single(generate, model, SPEC, dataclasses.replace(config, stop_at_eos=True), seed=7)
    assert out.nfe <= full.nfe and len(set(out.row_nfe)) > 1  # rows left the batch at different steps
    assert sum(out.row_nfe) < sum(full.row_nfe)
    for stopped, full_row in zip(out.output_ids, full.output_ids, strict=True):
        cut = next((i for i, t in enumerate(full_row) if t in (EOS, EOT)), len(full_row) - 1)
        assert stopped[: cut + 1] == full_row[: cut + 1]


def test_stop_at_eos_needs_a_stop_token():
    with pytest.raises(DlmcError, match="stop_at_eos needs spec.eos_token_id or spec.eot_token_id"):
        spec = toy_spec(shift_logits=True, eos_token_id=None, eot_token_id=None)
        generate(TinyDenoiser(SPEC), spec, [[1, 2]], DreamConfig(max_new_tokens=4, steps=4, stop_at_eos=True))


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(steps=0), "steps=0"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(eps=1.0), "eps=1.0"),
        (dict(alg="greedy"), "alg='greedy'"),
        (dict(alg_temp=-1.0), "alg_temp"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(threshold=2.0), "threshold"),
        (dict(alg="confidence_threshold", max_new_tokens=10, steps=4), "not divisible by steps=4"),
    ],
)
def test_config_rejects_impossible_settings(fields, message):
    with pytest.raises(DlmcError, match=message):
        DreamConfig(**fields)


def test_generate_rejects_too_long_requests():
    with pytest.raises(DlmcError, match="exceeds spec.max_length"):
        generate(TinyDenoiser(SPEC), toy_spec(shift_logits=True, max_length=8), [[1, 2]], DreamConfig(max_new_tokens=8))
