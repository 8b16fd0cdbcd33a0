"""delayed_kv: dKV-Cache-Decode against an eager implementation of the same approximation
(tests/passes/cache_oracle.py), its one-step delay, and its refusals."""

import pytest

from dlmc.compiler import compile_model
from dlmc.decoding import llada
from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.recipe import RecipeError, parse_recipe
from tests.passes.cache_oracle import OraclePolicy, compare_with_oracle, engine_builder

PROMPT = [5, 6, 7, 8, 9, 10]
CONFIG = LLaDAConfig(gen_length=12, steps=12, block_length=4)


def recipe(**options):
    return parse_recipe({"passes": [{"delayed_kv": options}], "lower": {"backend": "eager"}}, "test")


@pytest.fixture(scope="module")
def compiled(checkpoints, tmp_path_factory):
    return engine_builder(checkpoints, tmp_path_factory.mktemp("delayed_kv"), recipe)


def masked_rows(mask_id: int, shift: bool):
    """The rows the decoder reads: every masked column's predicting row."""

    def rows(canvas, block):
        return (canvas == mask_id).nonzero().squeeze(1) - int(shift)

    return rows


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("block_length", [None, 4])
def test_matches_eager_oracle(compiled, family, block_length):
    engine, model = compiled(family, refresh=3, block_length=block_length)
    policy = OraclePolicy(
        "delayed", len(PROMPT), engine.spec.mask_token_id, engine.spec.shift_logits,
        block_length=block_length, refresh=3,
    )
    assert compare_with_oracle(engine, model, CONFIG, PROMPT, policy, masked_rows(engine.spec.mask_token_id, engine.spec.shift_logits)) == 12


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_prefill_matches_eager_oracle(compiled, family):
    engine, model = compiled(family, mode="prefill", refresh=None)
    spec = engine.spec
    policy = OraclePolicy("prefill", len(PROMPT), spec.mask_token_id, spec.shift_logits)
    assert compare_with_oracle(engine, model, CONFIG, PROMPT, policy, masked_rows(spec.mask_token_id, spec.shift_logits)) == 12


def test_one_step_delay(compiled):
    """Between refreshes a step computes the masks and the token decoded by the step before."""
    engine, _ = compiled("llada", refresh=100)
    seen = []
    run_step = engine.run_step
    engine.run_step = lambda *inputs: seen.append(int(inputs[1].sum())) or run_step(*inputs)
    try:
        engine.generate([PROMPT], "llada", LLaDAConfig(gen_length=12, steps=12, block_length=12))
    finally:
        del engine.run_step
    # step 1: full (6 + 12 rows); step k > 1: 12 - (k - 1) masks + the token decoded at step k - 1
    assert seen == [18] + [12 - (k - 1) + 1 for k in range(2, 13)]


def test_refresh_every_step_is_the_reference(compiled, checkpoints):
    engine, model = compiled("llada", refresh=1)
    prompts = [PROMPT, [40, 41, 42]]
    expected = llada.generate(model, model.spec, prompts, CONFIG).output_ids
    assert engine.generate(prompts, "llada", CONFIG).output_ids == expected


def test_refusals(checkpoints, tmp_path):
    with pytest.raises(RecipeError, match="refresh: must be >= 1"):
        recipe(refresh=0)
    with pytest.raises(DlmcError, match="delayed_kv: supports bidirectional families"):
        compile_model(checkpoints["sdar"], recipe(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
