"""The fused loop's cached steps give what the unfused artifact of the same recipe gives (the reference
decoder through the cache manager): the fusion changes nothing, for the prefix cache and window pruning
as for the dual cache (`tests/runtime/test_loop.py`), every rule, batch 1 and prompts of different
lengths, rows joining mid-decode, under LLaDA's schedule without reading a device value back; the caches
it has no step for are refused in one line."""

import pytest

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.common import fill_undecided
from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.recipe import parse_recipe
from dlmc.runtime.loop import Decoding
from tests.runtime.test_loop import CONFIGS, JOINING, PROMPTS, SyncCounter

PREFIX = {"block_cache": {"mode": "prefix", "block_length": 4}}
WINDOW = {"window_pruning": {"window": 2, "block_length": 4}}  # gen_length 8: the last 2 masks are pruned


def compile_cached(checkpoint, out, cache: dict, backend="eager", fuse=True):
    passes = [{"fold_constants": {}}, cache] + ([{"fuse_decode": {"gumbel": True}}] if fuse else [])
    recipe = parse_recipe({"capture": {"max_batch": 4}, "passes": passes, "lower": {"backend": backend}})
    compile_model(checkpoint, recipe, out, force=True)
    return dlmc.runtime.load(out)


def assert_fusion_changes_nothing(fused, unfused, configs):
    for name, config in configs.items():
        for prompts in (PROMPTS[:1], PROMPTS):
            actual = fused.generate(prompts, "llada", config, seed=3)
            expected = unfused.generate(prompts, "llada", config, seed=3)
            assert (actual.output_ids, actual.nfe, actual.row_nfe) == (
                expected.output_ids, expected.nfe, expected.row_nfe), (name, len(prompts))


@pytest.mark.parametrize("cache", [PREFIX, WINDOW], ids=["prefix", "window"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cache_fusion_changes_nothing(checkpoints, tmp_path, family, cache):
    fused = compile_cached(checkpoints[family], tmp_path / "fused", cache)
    unfused = compile_cached(checkpoints[family], tmp_path / "unfused", cache, fuse=False)
    assert_fusion_changes_nothing(fused, unfused, CONFIGS)


def test_prefix_cache_with_refresh(checkpoints, tmp_path):
    """A full step every 2 steps inside a block, as the unfused cache manager refreshes."""
    cache = {"block_cache": {"mode": "prefix", "block_length": 4, "refresh": 2}}
    fused = compile_cached(checkpoints["llada"], tmp_path / "fused", cache)
    unfused = compile_cached(checkpoints["llada"], tmp_path / "unfused", cache, fuse=False)
    assert_fusion_changes_nothing(fused, unfused, {k: CONFIGS[k] for k in ("schedule", "threshold")})


def test_prefix_cache_on_aot_inductor(checkpoints, tmp_path):
    fused = compile_cached(checkpoints["llada"], tmp_path / "fused", PREFIX, backend="inductor")
    unfused = compile_cached(checkpoints["llada"], tmp_path / "unfused", PREFIX, fuse=False)
    assert_fusion_changes_nothing(fused, unfused, {"threshold": CONFIGS["threshold"]})


@pytest.mark.parametrize("cache,name", [*((PREFIX, name) for name in JOINING), (WINDOW, "sampled")],
                         ids=[*(f"prefix-{name}" for name in JOINING), "window-sampled"])
def test_a_row_joins_a_cached_batch(checkpoints, tmp_path, cache, name):
    """A wider row joins after two steps of another (re-padding its canvas and buffer), leaves first,
    and each row gets the tokens and evaluations of its solo run, which are the unfused artifact's.
    (Window pruning: the case whose rows both have masks to prune, gen_length > block + window.)"""
    fused = compile_cached(checkpoints["llada"], tmp_path / "fused", cache)
    unfused = compile_cached(checkpoints["llada"], tmp_path / "unfused", cache, fuse=False)
    (long, short), first = JOINING[name], PROMPTS[0]
    second = PROMPTS[1] + list(range(20, 28))  # 13 + 4 (or 8) columns: wider than the running 3 + 12
    decoding = Decoding(fused)
    a = decoding.add(first, long, seed=1)
    decoding.step(), decoding.step()
    b = decoding.add(second, short, seed=2)
    left = {}
    while len(decoding):
        for row in decoding.step():
            left[row.handle] = (decoding.nfe, row)
    assert left[b][0] < left[a][0]  # b left first, a went on alone (its canvas cut back)
    for (prompt, config, seed), handle in (((first, long, 1), a), ((second, short, 2), b)):
        solo = unfused.generate([prompt], "llada", config, seed=seed)
        row = left[handle][1]
        assert (fill_undecided(row.generated, fused.spec), row.nfe) == (solo.output_ids[0], solo.row_nfe[0]), name


@pytest.mark.parametrize("cache", [PREFIX, WINDOW], ids=["prefix", "window"])
def test_the_schedule_steps_without_host_syncs(checkpoints, tmp_path, monkeypatch, cache):
    """Which rows run a full step and how wide a step's inputs are come from the host: no step reads
    the device, rows joining mid-decode (full and cached rows in one step) included, and the tokens
    and NFE stay the unfused artifact's."""
    fused = compile_cached(checkpoints["llada"], tmp_path / "fused", cache)
    unfused = compile_cached(checkpoints["llada"], tmp_path / "unfused", cache, fuse=False)
    expected = {name: unfused.generate(PROMPTS, "llada", CONFIGS[name], seed=3) for name in ("schedule", "random")}
    counter = SyncCounter(monkeypatch)
    for name, reference in expected.items():
        counter.per_step.clear()
        actual = fused.generate(PROMPTS, "llada", CONFIGS[name], seed=3)
        assert (actual.output_ids, actual.nfe, actual.row_nfe) == (
            reference.output_ids, reference.nfe, reference.row_nfe), name
        assert counter.per_step == [0] * actual.nfe, name
    (long, short), decoding = JOINING["schedule"], Decoding(fused)
    counter.per_step.clear()
    decoding.add(PROMPTS[0], long, seed=1)
    decoding.step(), decoding.step()
    decoding.add(PROMPTS[1] + list(range(20, 28)), short, seed=2)
    while len(decoding):
        decoding.step()
    assert counter.per_step == [0] * decoding.nfe


@pytest.mark.parametrize("cache,name", [
    ({"delayed_kv": {"refresh": 4}}, "delayed"),
    ({"delayed_kv": {"mode": "prefill"}}, "prefill"),
])
def test_caches_without_a_fused_step_are_refused_in_one_line(checkpoints, tmp_path, cache, name):
    recipe = {"capture": {"max_batch": 4}, "passes": [{"fold_constants": {}}, cache, {"fuse_decode": {}}],
              "lower": {"backend": "eager"}}
    with pytest.raises(DlmcError, match="llada's loop runs uncached or under the dual/prefix/window cache"):
        parse_recipe(recipe)
    engine = compile_cached(checkpoints["llada"], tmp_path / "fused", PREFIX)
    engine.signature = type(engine.signature).from_dict(
        {**engine.signature.to_dict(), "cache": {"policy": name, "block_length": 4}})
    with pytest.raises(DlmcError, match=f"{name} cache has no fused loop; the fused llada loop runs uncached or "
                                        "with the dual/prefix/window cache"):
        engine.generate([[5, 6]], "llada", LLaDAConfig(gen_length=8, block_length=4))
