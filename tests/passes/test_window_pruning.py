"""window_pruning: the block computed, a window of masks after it kept as context, the rest pruned;
against an eager implementation of the same approximation (tests/passes/cache_oracle.py)."""

import pytest

from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.recipe import RecipeError, parse_recipe
from tests.passes.cache_oracle import OraclePolicy, block_rows, compare_with_oracle, engine_builder

PROMPT = [5, 6, 7, 8, 9, 10]
CONFIG = LLaDAConfig(gen_length=16, steps=16, block_length=4)


def recipe(**options):
    passes = [{"window_pruning": {"block_length": 4, "window": 4, **options}}]
    return parse_recipe({"passes": passes, "lower": {"backend": "eager"}}, "test")


@pytest.fixture(scope="module")
def compiled(checkpoints, tmp_path_factory):
    return engine_builder(checkpoints, tmp_path_factory.mktemp("window"), recipe)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("refresh", [None, 2])
def test_matches_eager_oracle(compiled, family, refresh):
    engine, model = compiled(family, refresh=refresh)
    spec = engine.spec
    policy = OraclePolicy("window", len(PROMPT), spec.mask_token_id, spec.shift_logits, block_length=4, window=4,
                          refresh=refresh)
    assert compare_with_oracle(engine, model, CONFIG, PROMPT, policy, block_rows(spec.shift_logits)) == 16


def test_prunes_the_far_masks(compiled):
    engine, _ = compiled("llada")
    seen = []
    run_step = engine.run_step
    engine.run_step = lambda *inputs: seen.append((int(inputs[1].sum()), int(inputs[3].sum()))) or run_step(*inputs)
    try:
        engine.generate([PROMPT], "llada", CONFIG)
    finally:
        del engine.run_step
    # block b's refresh: prompt + b decoded blocks + the block + up to 4 window masks, nothing cached;
    # then 3 steps of 4 block rows attending to the rest of that view.
    for b in range(4):
        view = 6 + 4 * b + 4 + min(4, 16 - 4 * (b + 1))
        assert seen[4 * b : 4 * b + 4] == [(view, 0)] + [(4, view - 4)] * 3


def test_refusals(compiled, checkpoints, tmp_path):
    engine, _ = compiled("llada")
    with pytest.raises(DlmcError, match="exceeds gen_length"):
        engine.generate([PROMPT], "llada", LLaDAConfig(gen_length=4, steps=4, block_length=4))
    with pytest.raises(RecipeError, match="window: must be >= 0"):
        recipe(window=-1)
    with pytest.raises(DlmcError, match="window_pruning: supports bidirectional families"):
        compile_model(checkpoints["fast_dllm_v2"], recipe(), tmp_path / "out")
