"""fuse_decode {decoder: block} and {decoder: llada2}: the fused step samples as the block decoders and LLaDA2's
samplers do, from the runtime's draws.

The draw is torch.multinomial's own: on the CPU, multinomial(probs, 1) is an exponential race, which the
first test pins down (tokens and the generator's state after the call), so the runtime can make the
same draw and the graph the same arg-max."""

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.decoding.block import BlockConfig, _filtered_sample, _nucleus_sample
from dlmc.decoding.llada2 import LLaDA2Config, _sample
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.passes.block_pick import pick_llada2
from dlmc.passes.fuse_decode import FuseDecode, fuse_decode
from dlmc.pipeline import check_program
from dlmc.recipe import parse_recipe
from tests.helpers import padded_batch, rounding_tolerance

ROWS = torch.tensor([[4, 5, 6, 7], [5, 6, 7, 8]])  # [B, K]: the rows sampled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multinomial_is_an_exponential_race(dtype):
    for seed, (rows, vocab) in enumerate([(1, 7), (4, 272), (8, 5000)] * 3):
        probs = torch.softmax(3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)), -1)
        probs = probs.to(dtype)
        probs[:, : vocab // 3] = 0  # filtered tokens
        drawn, raced = torch.Generator().manual_seed(seed + 100), torch.Generator().manual_seed(seed + 100)
        tokens = torch.multinomial(probs, 1, generator=drawn).squeeze(-1)  # [rows]
        noise = torch.empty_like(probs).exponential_(1, generator=raced)  # [rows, vocab]
        assert torch.equal(tokens, (probs / noise).argmax(-1))
        assert torch.equal(drawn.get_state(), raced.get_state())  # the same draws consumed


@pytest.fixture(scope="module")
def steps(checkpoints):
    families = ("fast_dllm_v2", "sdar")
    return {family: capture(load_model(checkpoints[family]), CaptureConfig(max_batch=4)) for family in families}


def sampled(program, inputs, config: BlockConfig, top_k: int, top_p: float, seed: int):
    """The fused step's tokens and probabilities with each row's noise drawn from its own generator."""
    vocab = program.signature.inputs[program.signature.names.index("noise")].shape[-1]
    noise = torch.stack([
        torch.empty(ROWS.shape[1], vocab).exponential_(1, generator=torch.Generator().manual_seed(seed + b))
        for b in range(len(ROWS))
    ]) if config.temperature > 0 else torch.ones(*ROWS.shape, vocab)
    extra = (torch.tensor([config.temperature], dtype=torch.float64), torch.tensor([top_k]),
             torch.tensor([top_p], dtype=torch.float64))
    return program(*inputs, ROWS, noise, *extra)


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar"])
def test_fused_step_is_the_block_samplers_math(steps, family):
    step = steps[family]
    fused = fuse_decode(step, FuseDecode(decoder="block", gumbel=True)).program
    check_program(fused)
    assert fused.signature.decoder == "block"
    assert fused.signature.names[-4:] == ["noise", "temperature", "top_k", "top_p"]
    inputs = padded_batch([9, 6], 9)
    logits = step(*inputs)  # [B, L, V]
    picked = logits.gather(1, ROWS[..., None].expand(-1, -1, logits.shape[-1]))  # [B, K, V]
    vocab = logits.shape[-1]
    tol = rounding_tolerance(torch.float32, 96, float(logits.abs().max()))
    cases = [  # (config, the reference sampler, top_k and top_p as the runtime passes them)
        (BlockConfig(temperature=0.8, top_p=0.9), _nucleus_sample, vocab, 0.9),
        (BlockConfig(temperature=0.8), _nucleus_sample, vocab, float("inf")),
        (BlockConfig(remasking="low_confidence_static", temperature=1.2, top_k=30, top_p=0.8), _filtered_sample,
         30, 0.8),
        (BlockConfig(remasking="low_confidence_static", top_k=3), _filtered_sample, 3, float("inf")),  # T = 0
    ]
    for config, reference, top_k, top_p in cases:
        tokens, probability, probability64 = sampled(fused, inputs, config, top_k, top_p, seed=7)
        for b in range(len(ROWS)):
            expected = reference(picked[b], config, torch.Generator().manual_seed(7 + b))
            expected_tokens = expected[0]
            expected_probability = expected[1] if expected[1].dim() == 1 else expected[1].gather(
                -1, expected_tokens[:, None]).squeeze(-1)
            assert torch.equal(tokens[b], expected_tokens), (config, b)
            torch.testing.assert_close(probability[b], expected_probability, atol=4 * tol, rtol=0)
        assert torch.equal(probability64, probability.double())


def test_greedy_block_step_takes_the_arg_max(steps):
    step = steps["sdar"]
    fused = fuse_decode(step, FuseDecode(decoder="block")).program
    assert fused.signature.names[-1] == "head_rows"
    inputs = padded_batch([9, 6], 9)
    logits = step(*inputs)
    picked = logits.gather(1, ROWS[..., None].expand(-1, -1, logits.shape[-1]))  # [B, K, V]
    top2 = picked.topk(2).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 2 * rounding_tolerance(torch.float32, 96, 5.0)
    tokens, probability, _ = fused(*inputs, ROWS)
    assert torch.equal(tokens, picked.argmax(-1))
    expected = torch.softmax(picked, -1).amax(-1)
    torch.testing.assert_close(probability, expected, atol=rounding_tolerance(torch.float32, 96, 5.0), rtol=0)


def test_refusals(steps, checkpoints):
    llada = capture(load_model(checkpoints["llada"]), CaptureConfig(max_batch=2))
    with pytest.raises(DlmcError, match="fuse_decode.decoder: block needs a block-causal model, not bidirectional"):
        fuse_decode(llada, FuseDecode(decoder="block"))
    known = r"\(known: auto, llada, dream, block, wedlm, llada2\)"
    with pytest.raises(DlmcError, match=r"fuse_decode.decoder: unknown decoder 'freedave' " + known):
        parse_recipe({"passes": [{"fuse_decode": {"decoder": "freedave"}}]})

    def problems(passes, decode=None):
        with pytest.raises(DlmcError) as e:
            parse_recipe({"passes": passes, **({"decode": decode} if decode else {})})
        return str(e.value)

    block = {"fuse_decode": {"decoder": "block"}}
    assert "cannot run after block_cache (block's loop runs uncached or under the exact cache)" in problems(
        [{"block_cache": {"mode": "dual"}}, block])
    assert "fuses the block decoder's rule, not llada's" in problems([block], {"decoder": "llada"})
    assert "cannot run after causal_cache (llada's loop runs uncached or under the dual/prefix/window cache)" in problems(
        [{"causal_cache": {}}, {"fuse_decode": {}}])
    parse_recipe({"passes": [{"causal_cache": {}}, {**block}], "decode": {"decoder": "block"}})


def test_llada2_rule_is_llada2s_sampler(moe_checkpoints):
    """fuse_decode {decoder: auto} on LLaDA2: tokens / confidence are `llada2`'s draw (the arg-max of the
    probabilities at T = 0), argmax / argmax_confidence the arg-max of the logits (`llada2_edit` at T = 0)."""
    step = capture(load_model(moe_checkpoints["llada2"]), CaptureConfig(max_batch=4))
    fused = fuse_decode(step, FuseDecode(decoder="auto", gumbel=True)).program
    check_program(fused)
    assert fused.signature.decoder == "llada2"
    assert [t.name for t in fused.signature.outputs] == ["tokens", "confidence", "argmax", "argmax_confidence"]
    assert [t.dtype for t in fused.signature.outputs] == ["int64", "float32", "int64", "float32"]
    inputs = padded_batch([9, 6], 9)
    logits = step(*inputs)  # [B, L, V]
    picked = logits.gather(1, ROWS[..., None].expand(-1, -1, logits.shape[-1]))  # [B, K, V]
    vocab = logits.shape[-1]
    tol = rounding_tolerance(torch.float32, vocab, float(logits.abs().max()))
    top2 = picked.topk(2).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 2 * tol, "near tie in the logits: pick other rows"
    cases = [(LLaDA2Config(), vocab, float("inf")), (LLaDA2Config(temperature=0.7, top_k=30, top_p=0.8), 30, 0.8)]
    for config, top_k, top_p in cases:
        tokens, confidence, argmax, argmax_confidence = sampled(fused, inputs, config, top_k, top_p, seed=7)
        assert torch.equal(argmax, picked.argmax(-1))
        for b in range(len(ROWS)):
            expected = _sample(picked[b], config, torch.Generator().manual_seed(7 + b), greedy_over_probs=True)
            assert torch.equal(tokens[b], expected[0]), (config, b)
            torch.testing.assert_close(confidence[b], expected[1], atol=4 * tol, rtol=0)
            greedy = _sample(picked[b], LLaDA2Config(), None, greedy_over_probs=False)
            assert torch.equal(argmax[b], greedy[0])
            torch.testing.assert_close(argmax_confidence[b], greedy[1], atol=4 * tol, rtol=0)


def test_llada2_recipes_serve_both_samplers():
    passes = [{"causal_cache": {}}, {"fuse_decode": {"decoder": "llada2", "gumbel": True}}]
    for decoder in ("llada2", "llada2_edit"):
        parse_recipe({"passes": passes, "decode": {"decoder": decoder}})
    with pytest.raises(DlmcError, match="fuses the llada2 decoder's rule, not block's"):
        parse_recipe({"passes": passes, "decode": {"decoder": "block"}})
    with pytest.raises(DlmcError, match="cannot run after block_cache"):
        parse_recipe({"passes": [{"block_cache": {"mode": "dual"}}, passes[1]]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llada2_pick_samples_as_the_reference_in_the_logits_dtype(dtype):
    """On logits alone (no model, so no rounding between two paths): the same draw and the same probability
    as `llada2`'s sampler, in bf16 too, where the temperature divides in float32 as a Python float does."""
    logits = 3 * torch.randn(2, 4, 272, generator=torch.Generator().manual_seed(0))  # [B, K, V]
    logits = logits.to(dtype)
    config = LLaDA2Config(temperature=0.8, top_k=40, top_p=0.9)
    noise = torch.stack([torch.empty(4, 272, dtype=dtype).exponential_(1, generator=torch.Generator().manual_seed(b))
                         for b in range(2)])  # [B, K, V]
    extra = (torch.tensor([0.8], dtype=torch.float64), torch.tensor([40]), torch.tensor([0.9], dtype=torch.float64))
    tokens, confidence, _, _ = pick_llada2(logits, noise, *extra)
    for b in range(2):
        expected = _sample(logits[b], config, torch.Generator().manual_seed(b), greedy_over_probs=True)
        assert torch.equal(tokens[b], expected[0]) and torch.equal(confidence[b], expected[1])
