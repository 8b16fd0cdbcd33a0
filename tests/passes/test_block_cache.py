"""block_cache: Fast-dLLM v1's prefix and dual caches, against an eager implementation of the same
approximation (tests/passes/cache_oracle.py), and its refusals."""

import pytest

from dlmc.compiler import compile_model
from dlmc.decoding import llada
from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.recipe import RecipeError, parse_recipe
from tests.passes.cache_oracle import OraclePolicy, block_rows, compare_with_oracle, engine_builder

PROMPT = [5, 6, 7, 8, 9, 10]
CONFIG = LLaDAConfig(gen_length=12, steps=12, block_length=4)


def recipe(**options):
    return parse_recipe({"passes": [{"block_cache": {"block_length": 4, **options}}], "lower": {"backend": "eager"}}, "test")


@pytest.fixture(scope="module")
def compiled(checkpoints, tmp_path_factory):
    return engine_builder(checkpoints, tmp_path_factory.mktemp("block_cache"), recipe)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_matches_eager_oracle(compiled, family, mode):
    engine, model = compiled(family, mode=mode)
    policy = OraclePolicy(mode, len(PROMPT), engine.spec.mask_token_id, engine.spec.shift_logits, block_length=4)
    calls = compare_with_oracle(engine, model, CONFIG, PROMPT, policy, block_rows(engine.spec.shift_logits))
    assert calls == 12


def test_refresh_every_step_is_the_reference(compiled):
    """refresh: 1 makes every step a full one: the reference decoder's tokens exactly."""
    engine, model = compiled("llada", mode="dual", refresh=1)
    prompts = [PROMPT, [40, 41, 42]]
    expected = llada.generate(model, model.spec, prompts, CONFIG).output_ids
    assert engine.generate(prompts, "llada", CONFIG).output_ids == expected


def test_batch_equals_single(compiled):
    engine, _ = compiled("llada", mode="dual")
    prompts = [PROMPT, [40, 41, 42]]
    batch = engine.generate(prompts, "llada", CONFIG).output_ids
    assert batch == [engine.generate([p], "llada", CONFIG).output_ids[0] for p in prompts]


def test_computes_only_the_block(compiled):
    engine, _ = compiled("llada", mode="dual")
    seen = []
    run_step = engine.run_step
    engine.run_step = lambda *inputs: seen.append(inputs[0].shape[1]) or run_step(*inputs)
    try:
        engine.generate([PROMPT], "llada", CONFIG)
    finally:
        del engine.run_step
    # 3 blocks of 4 steps: a full step (prompt + 12) then 3 steps over the 4 block rows.
    assert seen == [18, 4, 4, 4] * 3


def test_refusals(compiled, checkpoints, tmp_path):
    engine, _ = compiled("llada", mode="dual")
    with pytest.raises(DlmcError, match="block_length 4; got llada with block_length 12"):
        engine.generate([PROMPT], "llada", LLaDAConfig(gen_length=12, steps=12, block_length=12))
    with pytest.raises(DlmcError, match="supports bidirectional families"):
        compile_model(checkpoints["wedlm"], recipe(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match="refresh: must be >= 1"):
        recipe(refresh=0)
    with pytest.raises(RecipeError, match="mode"):
        recipe(mode="triple")
