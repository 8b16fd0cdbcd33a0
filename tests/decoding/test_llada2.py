import pytest
import torch

from dlmc.decoding.llada2 import LLaDA2Config, LLaDA2EditConfig, generate, generate_edit
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.testing.fixtures import write_checkpoint
from tests.decoding.conftest import (
    EOS,
    MASK,
    PAD,
    PROMPTS,
    ScriptedModel,
    TinyDenoiser,
    VOCAB,
    by_position,
    peaked,
    toy_spec,
)
from tests.helpers import rounding_tolerance

SPEC = toy_spec(attention="block_causal", block_size=4)


def decided(model: ScriptedModel, start: int) -> list[set[int]]:
    """For every call, the positions >= start already decided in its (single-row) input."""
    return [{q for q in range(start, call.input_ids.shape[1]) if call.input_ids[0, q] != MASK} for call in model.calls]


def lengths(model: ScriptedModel) -> list[int]:
    return [call.input_ids.shape[1] for call in model.calls]


# --- LLaDA2.0: threshold, quota fallback, steps ------------------------------------------------


def test_threshold_commits_every_confident_mask_else_the_quota():
    model = by_position({4: peaked(1, 0.97), 5: peaked(2, 0.96), 6: peaked(3, 0.5), 7: peaked(4, 0.4)})
    out = generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=4))
    # steps = block_length = 4, quota 1 per step: {4, 5} pass 0.95 together; then 6, then 7 by confidence
    assert decided(model, 4) == [set(), {4, 5}, {4, 5, 6}]
    assert out.output_ids == [[1, 2, 3, 4]]
    assert out.nfe == 3


def test_fallback_commits_the_scheduled_quota_by_confidence():
    model = by_position({4: peaked(1, 0.97), 5: peaked(2, 0.5), 6: peaked(3, 0.6), 7: peaked(4, 0.4)})
    generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=4, steps=2))
    # quota [2, 2]: one confident token is fewer than 2, so the two most confident (4 and 6) go in
    assert decided(model, 4) == [set(), {4, 6}]


def test_enough_confident_masks_commit_beyond_the_quota():
    model = by_position({4: peaked(1, 0.97), 5: peaked(2, 0.98), 6: peaked(3, 0.99), 7: peaked(4, 0.4)})
    generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=4, steps=2))
    assert decided(model, 4) == [set(), {4, 5, 6}]


def test_quota_never_exceeds_the_masks_of_a_block_holding_prompt_tokens():
    model = by_position({q: peaked(q % 7 + 1, 0.5) for q in range(12)})
    out = generate(model, SPEC, [[1, 2, 3, 4, 5]], LLaDA2Config(gen_length=7, steps=1))
    # quota 4 per block; block [4, 8) has 3 masks behind prompt token 5: all 3, then block [8, 12)
    assert lengths(model) == [8, 12]
    assert out.output_ids == [[q % 7 + 1 for q in range(5, 12)]]


def test_minimal_topk_caps_the_steps():
    model = by_position({q: peaked(1, 0.5) for q in range(4, 8)})
    out = generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=4, minimal_topk=2))
    assert out.nfe == 2  # steps = min(4, 4 // 2) = 2: quota [2, 2]


def test_steps_run_out_when_the_model_commits_the_mask_token():
    # position 7's confident prediction is the mask token: committing it changes nothing, the four
    # steps of block [4, 8) run out with masks left and the next block starts regardless
    model = by_position({4: peaked(1, 0.3), 5: peaked(2, 0.3), 6: peaked(3, 0.3), 7: peaked(MASK, 0.99)},
                        default=peaked(5, 0.99))
    out = generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=8))
    assert lengths(model) == [8] * 4 + [12]
    assert out.output_ids == [[PAD] * 4 + [5] * 4]


def test_greedy_arg_max_over_probabilities_vs_logits():
    # logits 0 and 1e-30 round to the same float32 probability: 2.0 takes the first such id, 2.1 the larger logit
    logits = torch.full((VOCAB,), -30.0)
    logits[3], logits[7] = 0.0, 1e-30
    model = ScriptedModel(lambda ids, pos: logits.expand(len(ids), VOCAB))
    assert generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=1)).output_ids == [[3]]
    config = LLaDA2EditConfig(gen_length=1, max_post_steps=0)
    assert generate_edit(model, SPEC, [[1, 2, 3, 4]], config).output_ids == [[7]]


def test_sampling_confidence_is_the_filtered_probability():
    model = by_position({q: peaked(q % 7 + 1, 0.6) for q in range(4, 8)})
    greedy = generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=4))
    assert greedy.nfe == 4  # 0.6 < 0.95: one token per step
    model = by_position({q: peaked(q % 7 + 1, 0.6) for q in range(4, 8)})
    sampled = generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=4, temperature=0.7, top_k=1), seed=3)
    assert sampled.nfe == 1  # top-k 1 leaves probability 1 on the arg-max: all four pass at once
    assert sampled.output_ids == greedy.output_ids


# --- LLaDA2.0: stopping ------------------------------------------------------------------------


def eos_rows(eos_at: int, eos_p: float = 0.99) -> dict[int, torch.Tensor]:
    rows = {q: peaked(q % 7 + 1, 0.5 + 0.01 * (7 - q)) for q in range(4, 8)}  # earlier positions first
    rows[eos_at] = peaked(EOS, eos_p)
    return rows


def test_row_stops_after_the_block_holding_eos():
    model = by_position(eos_rows(5), default=peaked(2, 0.99))
    out = generate(model, SPEC, [[1, 2, 3, 4]], LLaDA2Config(gen_length=8))
    assert out.nfe == 4
    assert out.output_ids == [[5, EOS, 7, 1, PAD, PAD, PAD, PAD]]  # tokens after EOS kept as produced


def test_eos_early_stop_right_after_a_settled_eos():
    config = LLaDA2Config(gen_length=8, eos_early_stop=True)
    out = generate(by_position(eos_rows(4)), SPEC, [[1, 2, 3, 4]], config)
    assert out.nfe == 1
    assert out.output_ids == [[EOS] + [PAD] * 7]
    # EOS at 5 comes first with 4 still masked; the step that fills 4 commits no EOS, so no early stop
    out = generate(by_position(eos_rows(5)), SPEC, [[1, 2, 3, 4]], config)
    assert out.nfe == 4


# --- LLaDA2.1: token editing -------------------------------------------------------------------


def editing_model() -> ScriptedModel:
    """Position 4 is predicted 1 until position 5 is decided, then 6 (p 0.93)."""

    def fn(ids, pos):
        rows = {4: peaked(1, 0.97), 5: peaked(2, 0.6), 6: peaked(3, 0.5), 7: peaked(4, 0.4)}
        if ids[5] != MASK:
            rows[4] = peaked(6, 0.93)
        return torch.stack([rows.get(int(q), peaked(0, 0.5)) for q in pos])

    return ScriptedModel(fn)


def test_token_editing_rewrites_a_decided_token_above_the_editing_threshold():
    model = editing_model()
    out = generate_edit(model, SPEC, [[1, 2, 3, 4]], LLaDA2EditConfig(gen_length=4))
    # M2T: 4 (0.97 > 0.95), then one by confidence: 5, 6, 7; the step that commits 6 also edits 4 -> 6
    # (0.93 > 0.9); one post step without masks edits nothing and ends the block
    assert decided(model, 4) == [set(), {4}, {4, 5}, {4, 5, 6}, {4, 5, 6, 7}]
    assert model.calls[3].input_ids[0, 4] == 6
    assert out.output_ids == [[6, 2, 3, 4]]
    assert out.nfe == 5


def test_no_edit_at_or_below_the_editing_threshold():
    model = editing_model()
    out = generate_edit(model, SPEC, [[1, 2, 3, 4]], LLaDA2EditConfig(gen_length=4, editing_threshold=0.95))
    assert out.output_ids == [[1, 2, 3, 4]]
    assert out.nfe == 5


def test_num_to_transfer_is_the_fallback_count():
    model = editing_model()
    generate_edit(model, SPEC, [[1, 2, 3, 4]], LLaDA2EditConfig(gen_length=4, threshold=1.0, num_to_transfer=3))
    assert decided(model, 4)[:2] == [set(), {4, 5, 6}]


def flipping_model() -> ScriptedModel:
    """Position 4 is confidently the other of {1, 2} than it holds; the prompt token 5 at position 4 of a
    longer prompt would be edited to 9 if prompt tokens were editable."""

    def fn(ids, pos):
        def row(q: int) -> torch.Tensor:
            if q == 4:
                return peaked({1: 2, 2: 1, 5: 9}.get(int(ids[4]), 1), 0.99)
            return peaked(q % 7 + 1, 0.99)

        return torch.stack([row(int(q)) for q in pos])

    return ScriptedModel(fn)


@pytest.mark.parametrize(("max_post_steps", "nfe", "token"), [(0, 1, 1), (1, 2, 2), (3, 4, 2), (4, 5, 1)])
def test_post_steps_bound_the_edits_after_the_last_mask(max_post_steps, nfe, token):
    out = generate_edit(flipping_model(), SPEC, [[1, 2, 3, 4]], LLaDA2EditConfig(gen_length=4,
                                                                                 max_post_steps=max_post_steps))
    assert out.nfe == nfe  # one step fills the block, then every post step flips position 4
    assert out.output_ids[0][0] == token


def test_prompt_tokens_in_the_first_block_are_never_edited():
    model = flipping_model()
    out = generate_edit(model, SPEC, [[1, 2, 3, 4, 5]], LLaDA2EditConfig(gen_length=3))
    assert out.nfe == 2  # fill, then a post step with no edit
    assert all(call.input_ids[0, 4] == 5 for call in model.calls)


def test_a_greedy_step_that_only_recommits_the_mask_token_is_an_error():
    model = by_position({4: peaked(MASK, 0.99)})
    with pytest.raises(DlmcError, match="mask token keeps winning at position 4"):
        generate_edit(model, SPEC, [[1, 2, 3, 4]], LLaDA2EditConfig(gen_length=4))


def test_a_sampled_mask_token_leaves_the_position_masked_for_the_next_step():
    coin = torch.full((VOCAB,), float("-inf"), dtype=torch.float64)
    coin[MASK] = coin[1] = 0.0  # position 4: the mask token or 1, even odds
    nfes = []
    for seed in range(6):
        model = by_position({4: coin, 5: peaked(2, 1.0), 6: peaked(2, 1.0), 7: peaked(2, 1.0)})
        out = generate_edit(model, SPEC, [[1, 2, 3, 4]], LLaDA2EditConfig(gen_length=4, temperature=1.0), seed=seed)
        assert out.output_ids == [[1, 2, 2, 2]]
        nfes.append(out.nfe)
    # 5..7 at once, then 4 (re-drawn while the draw is the mask token), then one post step
    assert min(nfes) == 3 and max(nfes) > 3


def test_editing_decodes_every_block_unless_eos_early_stop():
    rows = {4: peaked(1, 0.99), 5: peaked(EOS, 0.99), 6: peaked(2, 0.99), 7: peaked(3, 0.99)}
    model = by_position(rows, default=peaked(4, 0.99))
    out = generate_edit(model, SPEC, [[1, 2, 3, 4]], LLaDA2EditConfig(gen_length=8))
    assert out.nfe == 4  # per block: fill, one post step
    assert out.output_ids == [[1, EOS, 2, 3, 4, 4, 4, 4]]
    out = generate_edit(model, SPEC, [[1, 2, 3, 4]], LLaDA2EditConfig(gen_length=8, eos_early_stop=True))
    assert out.nfe == 2
    assert out.output_ids == [[1, EOS, 2, 3, PAD, PAD, PAD, PAD]]


# --- batch == single on the block-causal SDAR fixture ------------------------------------------


class Margins:
    """Wraps a model to record, over the open block of every row (its last block_length positions), the
    smallest top-2 logit gap, the smallest gap between two confidences and the smallest distance of a
    confidence from the thresholds: greedy decisions are robust to rounding when all clear it."""

    def __init__(self, model, block_length: int, thresholds: tuple[float, ...]):
        self.model, self.spec, self.block_length, self.thresholds = model, model.spec, block_length, thresholds
        self.gap, self.scale = float("inf"), 0.0

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.model(input_ids, attention_mask, position_ids)  # [B, L, V]
        self.scale = max(self.scale, float(logits.abs().max()))
        block = logits[:, -self.block_length :]  # [B, blk, V]
        top2 = block.topk(2, dim=-1).values  # [B, blk, 2]
        p = torch.softmax(block, dim=-1).amax(-1)  # [B, blk]
        gaps = [top2[..., 0] - top2[..., 1], p.sort(-1).values.diff(dim=-1)]
        gaps += [(p - t).abs() for t in self.thresholds]
        self.gap = min([self.gap] + [float(g.min()) for g in gaps])
        return logits

    def assert_clear(self, reduction: int) -> None:
        tol = rounding_tolerance(torch.float64, reduction, self.scale)
        assert self.gap > 4 * tol, f"near tie ({self.gap:.2g}): pick other prompts"


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    # float64 weights: a sampled draw could only flip between batch and single on a rounding-size tie
    return load_model(write_checkpoint("sdar", tmp_path_factory.mktemp("sdar") / "m"), dtype=torch.float64)


@pytest.mark.parametrize(
    ("generate_fn", "config"),
    [
        (generate, LLaDA2Config(gen_length=10, threshold=0.3)),
        (generate, LLaDA2Config(gen_length=9, steps=2, threshold=0.2, eos_early_stop=True)),
        (generate, LLaDA2Config(gen_length=10, threshold=0.2, temperature=0.8, top_k=50, top_p=0.9)),
        (generate_edit, LLaDA2EditConfig(gen_length=10, threshold=0.3, editing_threshold=0.2)),
        (generate_edit, LLaDA2EditConfig(gen_length=9, threshold=0.2, editing_threshold=0.1, temperature=1.0)),
    ],
)
def test_batch_equals_single_on_the_sdar_fixture(sdar, generate_fn, config):
    spec, prompts = sdar.spec, [[p + 20 for p in prompt] for prompt in PROMPTS]
    thresholds = (config.threshold, getattr(config, "editing_threshold", config.threshold))
    model = Margins(sdar, spec.block_size, thresholds)
    batched = generate_fn(model, spec, prompts, config, seed=11)
    for prompt, row in zip(prompts, batched.output_ids, strict=True):
        assert generate_fn(model, spec, [prompt], config, seed=11).output_ids[0] == row
        assert len(row) == config.gen_length
    if config.temperature == 0:
        model.assert_clear(reduction=sdar.spec.vocab_size)


def test_rows_of_a_batch_draw_from_their_own_generators():
    spec = SPEC
    config = LLaDA2Config(gen_length=8, temperature=1.0)
    model = TinyDenoiser(spec, seed=2)
    twice = generate(model, spec, [[1, 2, 3], [1, 2, 3]], config, seed=4).output_ids
    assert twice[0] == twice[1] == generate(model, spec, [[1, 2, 3]], config, seed=4).output_ids[0]


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_type", "fields", "message"),
    [
        (LLaDA2Config, dict(gen_length=0), "gen_length=0"),
        (LLaDA2Config, dict(threshold=1.5), "threshold=1.5"),
        (LLaDA2Config, dict(steps=0), "steps=0"),
        (LLaDA2Config, dict(minimal_topk=0), "minimal_topk=0"),
        (LLaDA2Config, dict(gen_length=4, minimal_topk=5), "minimal_topk=5 exceeds gen_length=4"),
        (LLaDA2Config, dict(temperature=-1.0), "temperature"),
        (LLaDA2Config, dict(top_k=0), "top_k=0"),
        (LLaDA2Config, dict(top_p=0.0), "top_p=0.0"),
        (LLaDA2Config, dict(block_length=0), "block_length=0"),
        (LLaDA2EditConfig, dict(editing_threshold=-0.1), "editing_threshold=-0.1"),
        (LLaDA2EditConfig, dict(max_post_steps=-1), "max_post_steps=-1"),
        (LLaDA2EditConfig, dict(num_to_transfer=0), "num_to_transfer=0"),
    ],
)
def test_config_rejects_impossible_settings(config_type, fields, message):
    with pytest.raises(DlmcError, match=message):
        config_type(**fields)


@pytest.mark.parametrize("generate_fn", [generate, generate_edit])
@pytest.mark.parametrize(
    ("spec", "fields", "message"),
    [
        (toy_spec(), dict(gen_length=4), "block-causal"),
        (toy_spec(attention="block_causal", block_size=4, shift_logits=True), dict(gen_length=4), "shift"),
        (SPEC, dict(gen_length=4, block_length=8), "block_length=8 differs"),
        (toy_spec(attention="block_causal", block_size=4, max_length=9), dict(gen_length=7), "= 12 tokens"),
    ],
)
def test_generate_rejects_settings_the_model_cannot_meet(generate_fn, spec, fields, message):
    config = (LLaDA2Config if generate_fn is generate else LLaDA2EditConfig)(**fields)
    with pytest.raises(DlmcError, match=message):
        generate_fn(TinyDenoiser(SPEC), spec, [[1, 2]], config)
