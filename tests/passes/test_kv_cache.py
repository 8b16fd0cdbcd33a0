"""The K/V cache rewrite shared by the caching passes: structure, exactness on any split, refusals."""

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.passes.kv_cache import add_kv_cache
from dlmc.pipeline import check_program
from dlmc.runtime.cache import empty_cache
from dlmc.testing.fixtures import FAMILIES
from tests.helpers import assert_equal_up_to_rounding, padded_batch

aten = torch.ops.aten


@pytest.fixture(scope="module")
def programs(checkpoints):
    """family -> (captured step, the same step with a K/V cache)"""
    built = {}
    for family in FAMILIES:
        step = capture(load_model(checkpoints[family]), CaptureConfig(max_batch=4))
        built[family] = step, add_kv_cache(step, {"policy": "test"})
    return built


def test_signature_and_graph(programs):
    step, cached = programs["dream"]  # grouped-query attention: 4 heads, 2 kv heads
    check_program(cached)
    sig = cached.signature
    assert [t.name for t in sig.inputs] == [
        "input_ids", "attention_mask", "position_ids", "cache_mask", "cache_positions", "cache_keys", "cache_values"
    ]
    assert [t.name for t in sig.outputs] == ["logits", "keys", "values"]
    assert sig.cache == {"policy": "test"}
    layers = sum(1 for n in step.graph_module.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    cats = [n for n in cached.graph_module.graph.nodes if n.target is aten.cat.default and n.args[1] == 2]
    assert len(cats) == 2 * layers  # one K and one V concat per attention layer
    # The cache holds the kv heads before grouped-query repetition.
    assert sig.inputs[-1].shape == (layers, "batch", 2, "cache", 16)
    # Layers are still findable by module path.
    stacks = {list(n.meta["nn_module_stack"].values())[-1][0] for n in cats}
    assert stacks == {f"layers.{i}.attn" for i in range(layers)}


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_cache_is_the_plain_step(programs, family):
    step, cached = programs[family]
    inputs = padded_batch([9, 6], 9)
    logits, keys, values = cached(*inputs, *empty_cache(cached.signature, 2))
    # Same maths, not the same kernels: the keys are [empty cache ; fresh], another attention layout.
    assert_equal_up_to_rounding(logits, step(*inputs), reduction=96)
    assert keys.shape[3] == 9 and values.shape == keys.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefix_gives_the_same_logits(programs, family):
    """The K/V of the first columns, fed back as cache, reproduce the later rows' logits (any family)."""
    step, cached = programs[family]
    ids, mask, pos = padded_batch([11, 8], 11)
    full, keys, values = cached(ids, mask, pos, *empty_cache(cached.signature, 2))
    split = 5
    logits, _, _ = cached(
        ids[:, split:], mask[:, split:], pos[:, split:],
        mask[:, :split], pos[:, :split], keys[:, :, :, :split].contiguous(), values[:, :, :, :split].contiguous(),
    )
    torch.testing.assert_close(logits, full[:, split:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bidirectional_any_split(programs, family):
    """Without a causal order, queries and cached keys can be any interleaving of the columns."""
    step, cached = programs[family]
    ids, mask, pos = padded_batch([10, 10], 10)
    full, keys, values = cached(ids, mask, pos, *empty_cache(cached.signature, 2))
    q, c = torch.tensor([1, 4, 5, 9]), torch.tensor([0, 2, 3, 6, 7, 8])
    logits, _, _ = cached(ids[:, q], mask[:, q], pos[:, q], mask[:, c], pos[:, c], keys[:, :, :, c], values[:, :, :, c])
    torch.testing.assert_close(logits, full[:, q], rtol=1e-5, atol=1e-5)


def test_refusals(programs, checkpoints):
    _, cached = programs["llada"]
    with pytest.raises(DlmcError, match="already has a K/V cache"):
        add_kv_cache(cached, {"policy": "test"})
    bucketed = capture(load_model(checkpoints["llada"]), CaptureConfig(seq_buckets=(16, 32)))
    with pytest.raises(DlmcError, match="seq_buckets"):
        add_kv_cache(bucketed, {"policy": "test"})
