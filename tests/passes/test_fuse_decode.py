"""fuse_decode: the fused step's tokens and confidences are the reference decoders' math on its logits."""

import dataclasses

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.decoding.common import gumbel_max_logits, token_probability
from dlmc.decoding.dream import DreamConfig, _sample_tokens
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.passes.block_cache import BlockCache, block_cache
from dlmc.passes.causal_cache import CausalCache, causal_cache
from dlmc.passes.fuse_decode import FuseDecode, fuse_decode
from dlmc.pipeline import check_program
from dlmc.recipe import parse_recipe
from dlmc.runtime.cache import empty_cache
from dlmc.testing.fixtures import FAMILIES
from tests.helpers import padded_batch, rounding_tolerance

ROWS = torch.tensor([[4, 7, 8], [5, 6, 8]])  # [B, K]: the rows whose tokens are decoded


@pytest.fixture(scope="module")
def steps(checkpoints):
    return {family: capture(load_model(checkpoints[family]), CaptureConfig(max_batch=4)) for family in FAMILIES}


def expected_outputs(logits: torch.Tensor, rows: torch.Tensor, uniform=None, temperature=0.0):
    """The reference decoders' per-row math: gumbel_max_logits, then token_probability."""
    picked = logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))  # [B, K, V]
    tokens = []
    for b in range(len(picked)):
        generator = torch.Generator().manual_seed(b)
        noisy = gumbel_max_logits(picked[b], temperature, generator) if uniform is None else (
            picked[b].double().exp() / (-torch.log(uniform[b])) ** temperature)
        tokens.append(noisy.argmax(-1))
    tokens = torch.stack(tokens)  # [B, K]
    return tokens, token_probability(picked, tokens, logits.dtype), token_probability(picked, tokens, torch.float64)


def assert_fused_matches(actual, expected, scale):
    tokens, confidence, confidence64 = actual[:3]
    assert torch.equal(tokens, expected[0])  # the inputs are fixed and their margins clear (checked below)
    tol = rounding_tolerance(torch.float32, 96, scale)
    torch.testing.assert_close(confidence, expected[1], atol=tol, rtol=0)
    torch.testing.assert_close(confidence64, expected[2], atol=tol, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_step_is_the_decoders_math_on_the_logits(steps, family):
    step = steps[family]
    fused = fuse_decode(step, FuseDecode()).program
    check_program(fused)
    assert fused.signature.fused and fused.signature.names[-1] == "head_rows"
    inputs = padded_batch([9, 6], 9)
    logits = step(*inputs)  # [B, L, V]
    top2 = logits.gather(1, ROWS[..., None].expand(-1, -1, logits.shape[-1])).topk(2).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 2 * rounding_tolerance(torch.float32, 96, 5.0)
    assert_fused_matches(fused(*inputs, ROWS), expected_outputs(logits, ROWS), float(logits.abs().max()))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sampling_takes_the_runtimes_uniforms(steps, family):
    step = steps[family]
    fused = fuse_decode(step, FuseDecode(gumbel=True)).program
    inputs = padded_batch([9, 6], 9)
    logits = step(*inputs)
    uniform = torch.rand(2, 3, logits.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    temperature = torch.tensor([0.8], dtype=torch.float64)
    expected = expected_outputs(logits, ROWS, uniform, 0.8)
    assert_fused_matches(fused(*inputs, ROWS, uniform, temperature), expected, float(logits.abs().max()))
    # at temperature 0 the uniforms are ignored: the plain arg-max
    greedy = fused(*inputs, ROWS, uniform, torch.zeros(1, dtype=torch.float64))
    assert_fused_matches(greedy, expected_outputs(logits, ROWS), float(logits.abs().max()))


def test_fuses_after_a_dual_cache(steps):
    step = steps["llada"]
    cached = block_cache(step, BlockCache(mode="dual", block_length=4)).program
    fused = fuse_decode(cached, FuseDecode()).program
    assert [t.name for t in fused.signature.outputs] == ["tokens", "confidence", "confidence64", "keys", "values"]
    inputs = padded_batch([9, 6], 9)
    nothing = empty_cache(cached.signature, 2)
    logits, keys, values = cached(*inputs, *nothing)
    tokens, confidence, confidence64, fused_keys, fused_values = fused(*inputs, *nothing, ROWS)
    assert_fused_matches((tokens, confidence, confidence64), expected_outputs(logits, ROWS), float(logits.abs().max()))
    torch.testing.assert_close(fused_keys, keys)


def test_refusals(steps):
    fused = fuse_decode(steps["llada"], FuseDecode()).program
    with pytest.raises(DlmcError, match="already fused"):
        fuse_decode(fused, FuseDecode())


def test_recipe_checks():
    def problems(passes, decode=None):
        with pytest.raises(DlmcError) as e:
            parse_recipe({"passes": passes, **({"decode": decode} if decode else {})})
        return str(e.value)

    assert "fuse_decode must be the last pass" in problems([{"fuse_decode": {}}, {"fold_constants": {}}])
    assert "cannot run after delayed_kv" in problems([{"delayed_kv": {}}, {"fuse_decode": {}}])
    assert "not dream's" in problems([{"fuse_decode": {}}], {"decoder": "dream"})
    for cache in ({"block_cache": {"mode": "dual"}}, {"block_cache": {"mode": "prefix"}}, {"window_pruning": {}}):
        parse_recipe({"passes": [cache, {"fuse_decode": {"gumbel": True}}]})


def dream_reference(logits: torch.Tensor, rows: torch.Tensor, config: DreamConfig, seed: int = 0):
    """Dream's `_sample_tokens` on the head rows, every metric, one generator per batch row."""
    picked = logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))  # [B, K, V]
    out = {metric: [] for metric in ("maskgit_plus", "topk_margin", "entropy")}
    for b in range(len(picked)):
        for metric in out:
            out[metric].append(_sample_tokens(picked[b], config, torch.Generator().manual_seed(seed + b), metric))
    tokens = torch.stack([t for _, t in out["maskgit_plus"]])  # [B, K]
    scores = [torch.stack([s for s, _ in out[m]]) for m in out]  # 3 x [B, K]
    return tokens, *scores


@pytest.mark.parametrize("sampled", [False, True])
def test_dream_rule_is_sample_tokens(steps, sampled):
    """The dream rule returns `_sample_tokens`'s token and its three scores; sampled, it draws the
    token from the Exp(1) variates torch.multinomial would draw from the same generator."""
    step = steps["dream"]
    fused = fuse_decode(step, FuseDecode(decoder="dream", gumbel=True, filters=True)).program
    check_program(fused)
    assert [t.name for t in fused.signature.outputs] == ["tokens", "probability", "margin", "neg_entropy"]
    assert fused.signature.names[-5:] == ["head_rows", "exponential", "temperature", "top_p", "top_k"]
    inputs = padded_batch([9, 6], 9)
    logits = step(*inputs)  # [B, L, V]
    V = logits.shape[-1]
    configs = [DreamConfig(), DreamConfig(top_p=0.5), DreamConfig(top_k=3), DreamConfig(top_p=0.9, top_k=40)]
    if sampled:
        configs = [dataclasses.replace(c, temperature=0.8) for c in configs]
    for config in configs:
        exponential = torch.ones(2, 3, V)  # [B, K, V]: what the runtime draws for each row
        for b in range(2):
            if sampled:
                exponential[b] = torch.empty(3, V).exponential_(1, generator=torch.Generator().manual_seed(b))
        settings = (torch.tensor([config.temperature], dtype=torch.float64),
                    torch.tensor([config.top_p or float("inf")], dtype=torch.float64),
                    torch.tensor([config.top_k or 2**31 - 1]))
        actual = fused(*inputs, ROWS, exponential, *settings)
        expected = dream_reference(logits, ROWS, config)
        assert torch.equal(actual[0], expected[0]), config  # eager, the same kernels on the same rows
        tol = rounding_tolerance(torch.float32, 96, float(logits.abs().max()))
        for a, e in zip(actual[1:], expected[1:]):
            torch.testing.assert_close(a, e, atol=tol, rtol=0)


def test_dream_rule_without_inputs_is_greedy(steps):
    step = steps["dream"]
    fused = fuse_decode(step, FuseDecode(decoder="dream")).program
    assert fused.signature.names[-1] == "head_rows"
    inputs = padded_batch([9, 6], 9)
    expected = dream_reference(step(*inputs), ROWS, DreamConfig())
    actual = fused(*inputs, ROWS)
    assert torch.equal(actual[0], expected[0])
    for a, e in zip(actual[1:], expected[1:]):
        torch.testing.assert_close(a, e)


def test_auto_takes_the_models_sampler(steps):
    assert FuseDecode(decoder="auto").resolved(steps["dream"].spec).decoder == "dream"
    assert FuseDecode(decoder="auto").resolved(steps["llada"].spec).decoder == "llada"
    fused = fuse_decode(steps["dream"], FuseDecode(decoder="auto")).program
    assert fused.signature.fused_decoder == "dream"
    wedlm = fuse_decode(steps["wedlm"], FuseDecode(decoder="auto")).program
    assert wedlm.signature.fused_decoder == "wedlm"
    with pytest.raises(DlmcError, match="fuse_decode.filters: only the dream rule"):
        FuseDecode(decoder="auto", filters=True).resolved(steps["llada"].spec)
    with pytest.raises(DlmcError, match="fuse_decode.decoder: unknown decoder 'sdar'"):
        FuseDecode(decoder="sdar")


def test_wedlm_rule_signature_and_refusals(steps):
    """The wedlm rule's inputs and outputs (fill is bool); it needs a causal model with same-position
    logits, and takes no strategy outputs."""
    fused = fuse_decode(steps["wedlm"], FuseDecode(decoder="wedlm", gumbel=True)).program
    check_program(fused)
    assert [(t.name, t.dtype) for t in fused.signature.outputs[:3]] == [
        ("tokens", "int64"), ("fill", "bool"), ("entropy", "float32")]
    assert fused.signature.names[-8:] == ["head_rows", "slots", "pos_penalty", "entropy_threshold", "noise",
                                          "temperature", "top_k", "top_p"]
    with pytest.raises(DlmcError, match="wedlm needs a causal model with same-position logits, not bidirectional"):
        fuse_decode(steps["llada"], FuseDecode(decoder="wedlm"))
    with pytest.raises(DlmcError, match="fuse_decode.outputs: only the llada rule takes extra outputs"):
        FuseDecode(decoder="wedlm", outputs=("entropy",))


def test_wedlm_rule_runs_uncached_or_under_the_exact_cache(steps):
    """After causal_cache the fused step keeps the cache inputs and outputs (the fused wedlm loop feeds
    them); an approximate cache is refused in the recipe."""
    cached = causal_cache(steps["wedlm"], CausalCache()).program
    fused = fuse_decode(cached, FuseDecode(decoder="auto")).program
    check_program(fused)
    assert fused.signature.cache == {"policy": "exact"} and fused.signature.fused_decoder == "wedlm"
    assert [t.name for t in fused.signature.outputs] == ["tokens", "fill", "entropy", "keys", "values"]
    with pytest.raises(DlmcError, match=r"cannot run after block_cache \(wedlm's loop runs uncached or under the "
                                        r"exact cache\)"):
        parse_recipe({"passes": [{"block_cache": {"mode": "dual"}}, {"fuse_decode": {"decoder": "wedlm"}}]})


def test_dream_rule_runs_uncached(steps):
    cached = block_cache(steps["dream"], BlockCache(mode="dual", block_length=4)).program
    with pytest.raises(DlmcError, match="the dream rule's loop runs uncached, not under a dual cache"):
        fuse_decode(cached, FuseDecode(decoder="dream"))


def test_dream_recipe_checks():
    def problems(passes, decode=None):
        with pytest.raises(DlmcError) as e:
            parse_recipe({"passes": passes, **({"decode": decode} if decode else {})})
        return str(e.value)

    assert "fuses the dream decoder's rule, not llada's" in problems([{"fuse_decode": {"decoder": "dream"}}],
                                                                      {"decoder": "llada"})
    assert "fuses the llada or dream or block or wedlm or llada2 decoder's rule, not freedave's" in problems(
        [{"fuse_decode": {"decoder": "auto"}}], {"decoder": "freedave"})
    dual = {"block_cache": {"mode": "dual"}}
    refused = problems([dual, {"fuse_decode": {"decoder": "dream"}}])
    assert "fuse_decode {decoder: dream} cannot run after block_cache (dream's loop runs uncached only)" in refused
    parse_recipe({"passes": [{"fuse_decode": {"decoder": "auto"}}], "decode": {"decoder": "dream"}})


def test_the_strategy_outputs_option():
    from dlmc.passes.fuse_decode import pick_tokens

    assert FuseDecode(outputs=("margin", "entropy")).outputs == ("entropy", "margin")  # one order
    with pytest.raises(DlmcError, match=r"^fuse_decode.outputs: unknown output 'logits' \(known: entropy, margin, "
                       r"top_probs, top_ids\)$"):
        FuseDecode(outputs=("logits",))
    with pytest.raises(DlmcError, match=r"^fuse_decode.outputs: only the llada rule takes extra outputs \(strategies\), not dream$"):
        FuseDecode(decoder="dream", outputs=("entropy",))
    # hand-worked: two equal logits and a third 1 below
    logits = torch.tensor([[[1.0, 1.0, 0.0]]])  # [1, 1, 3]
    *_, entropy, margin = pick_tokens(logits, outputs=("entropy", "margin"))
    p = torch.tensor([1.0, 1.0, torch.e ** -1], dtype=torch.float64) / (2 + torch.e ** -1)
    assert torch.allclose(entropy, -(p * p.log()).sum().reshape(1, 1))
    assert margin.tolist() == [[0.0]]
    # the top candidates (all 3 here: fewer than TOP), most likely first; ties keep one order in both paths
    *_, probs, ids = pick_tokens(logits, outputs=("top_probs", "top_ids"))
    assert probs.shape == ids.shape == (1, 1, 3) and ids[0, 0, 2] == 2
    assert torch.allclose(probs, p.sort(descending=True).values.reshape(1, 1, 3))
