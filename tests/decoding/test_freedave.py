import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding import decode
from dlmc.decoding import llada
from dlmc.decoding.freedave import FreeDaveConfig, generate
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from tests.decoding.conftest import EOS, MASK, PROMPTS, ScriptedModel, TinyDenoiser, by_position, peaked, toy_spec
from tests.helpers import MarginRecorder

SPEC = toy_spec()


def static(model, spec, prompts, config: FreeDaveConfig):
    return llada.generate(model, spec, prompts, config.static())


# --- hand-worked cases ------------------------------------------------------------------------


def test_drafts_of_logits_that_never_change_are_all_accepted():
    # logits do not depend on the canvas: every draft is what the static decoder does next
    rows = {2: peaked(3, 0.6), 3: peaked(4, 0.8), 4: peaked(5, 0.7), 5: peaked(6, 0.99)}
    model = by_position(rows)
    config = FreeDaveConfig(gen_length=4, drafts=4)
    out = generate(model, SPEC, [[1, 2]], config)
    assert out.output_ids == static(by_position(rows), SPEC, [[1, 2]], config).output_ids == [[3, 4, 5, 6]]
    # call 1: the prompt's canvas; call 2: d_1..d_3 (d_4 fills the canvas and needs no logits), all accepted
    assert (out.nfe, out.row_nfe) == (2, [2])
    assert [len(call.input_ids) for call in model.calls] == [1, 3]


def test_drafts_that_always_miss_cost_what_the_static_decoder_costs():
    # the leftmost mask is the most confident, the rightmost the second: a stale ranking drafts the
    # rightmost next, fresh logits pick the new leftmost, so only d_1 is ever accepted
    def fn(ids, pos):
        masked = (ids == MASK).nonzero().squeeze(1).tolist()
        rows = [peaked(7, 0.5) for _ in pos]
        if masked:
            rows[masked[0]] = peaked(7, 0.9)
            rows[masked[-1]] = peaked(8, 0.8) if len(masked) > 1 else rows[masked[-1]]
        return torch.stack(rows)

    model = ScriptedModel(fn)
    config = FreeDaveConfig(gen_length=6, drafts=3)
    out = generate(model, SPEC, [[1, 2]], config)
    reference = static(ScriptedModel(fn), SPEC, [[1, 2]], config)
    assert out.output_ids == reference.output_ids == [[7] * 6]
    assert out.nfe == reference.nfe == 6  # 1 + one call per step but the last, whose d_1 needs no logits


# --- identity with the static decoder -------------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize(("gen_length", "block_length"), [(8, 8), (12, 4)])
@pytest.mark.parametrize("drafts", [1, 2, 5])
def test_tokens_equal_the_static_decoder(shift, gen_length, block_length, drafts):
    spec = toy_spec(shift_logits=shift)
    model = TinyDenoiser(spec, seed=3)
    config = FreeDaveConfig(gen_length=gen_length, block_length=block_length, drafts=drafts)
    out = generate(model, spec, PROMPTS, config)
    reference = static(model, spec, PROMPTS, config)
    assert out.output_ids == reference.output_ids
    assert out.nfe <= reference.nfe
    if drafts == 1:  # one draft is the static step itself: one call per step, the last one free
        assert out.nfe == reference.nfe


def test_batch_rows_equal_their_single_runs():
    model = TinyDenoiser(SPEC, seed=5)
    config = FreeDaveConfig(gen_length=8, block_length=4, drafts=3)
    batched = generate(model, SPEC, PROMPTS, config)
    for prompt, row, row_nfe in zip(PROMPTS, batched.output_ids, batched.row_nfe, strict=True):
        alone = generate(model, SPEC, [prompt], config)
        assert (alone.output_ids[0], alone.nfe) == (row, row_nfe)


def test_stop_at_eos_stops_where_the_static_decoder_stops():
    # EOS is the most confident token from position 4 on: rows settle their stop in the first block
    rows = {q: peaked(EOS, 0.95) for q in range(4, 12)}
    model = by_position(rows | {2: peaked(3, 0.6), 3: peaked(4, 0.9)})
    config = FreeDaveConfig(gen_length=8, block_length=4, drafts=3, stop_at_eos=True)
    out = generate(model, SPEC, [[1, 2]], config)
    reference = static(model, SPEC, [[1, 2]], config)
    assert out.output_ids == reference.output_ids
    assert out.output_ids[0][:4] == [3, 4, EOS, EOS]
    assert out.nfe < reference.nfe


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_checkpoint_families_decode_the_static_tokens(checkpoints, family):
    model = load_model(checkpoints[family])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    config = FreeDaveConfig(gen_length=8, block_length=4, drafts=4)
    recorder = MarginRecorder(model, config.gen_length, config.block_length)
    reference = llada.generate(recorder, model.spec, prompts, config.static())
    recorder.assert_clear(reduction=96)  # every static decision clears the rounding tolerance
    out = generate(model, model.spec, prompts, config)
    assert out.output_ids == reference.output_ids
    assert out.nfe <= reference.nfe


def test_a_compiled_steps_logits_drive_it(checkpoints, tmp_path):
    passes = [{"fold_constants": {}}]
    recipe = parse_recipe({"capture": {"max_batch": 4}, "passes": passes, "lower": {"backend": "eager"}})
    compile_model(checkpoints["llada"], recipe, tmp_path / "art", force=True)
    engine = dlmc.runtime.load(tmp_path / "art")
    model = load_model(checkpoints["llada"])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    config = FreeDaveConfig(gen_length=8, block_length=4, drafts=4)  # 2 rows x 4 drafts: chunks of max_batch
    recorder = MarginRecorder(model, config.gen_length, config.block_length)
    reference = llada.generate(recorder, model.spec, prompts, config.static())
    recorder.assert_clear(reduction=96)
    out = decode(engine, engine.spec, prompts, "freedave", config)
    assert out.output_ids == reference.output_ids


# --- checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        (dict(drafts=0), "drafts=0"),
        (dict(gen_length=8, block_length=3), "block_length=3"),
        (dict(gen_length=0), "gen_length=0"),
    ],
)
def test_bad_settings_name_the_field(fields, fragment):
    with pytest.raises(DlmcError, match=fragment):
        FreeDaveConfig(**fields)
