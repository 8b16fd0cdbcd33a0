"""cpu_attention: every bf16 attention of the step becomes one dlmc_cpu.attention call, plain and cached steps
give the unrewritten step's outputs within bf16 rounding, AOTInductor packages call the kernel, and a CPU
without the instructions is refused in one line or (fallback: sdpa) keeps ATen's attention."""

import dataclasses
import json

import pytest
import torch

import dlmc.runtime
from dlmc.capture import CaptureConfig, capture
from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.generation import default_model_dir
from dlmc.kernels import cpu_attention as kernel
from dlmc.lower.eager import EagerSettings
from dlmc.models import load_model
from dlmc.passes.block_cache import BlockCache, block_cache
from dlmc.passes.cpu_attention import CpuAttention, cpu_attention
from dlmc.passes.kv_cache import _SDPA
from dlmc.pipeline import check_program
from dlmc.recipe import load_recipe, parse_recipe
from dlmc.runtime.backends import load_kernels
from tests.helpers import padded_batch

needs_kernel = pytest.mark.skipif(bool(kernel.missing_cpu_flags()),
                                  reason=f"this CPU lacks {kernel.missing_cpu_flags()} (the kernel's instructions)")


@pytest.fixture(scope="module")
def step(checkpoints):
    return capture(load_model(checkpoints["llada"], dtype=torch.bfloat16), CaptureConfig(dtype="bfloat16", max_batch=4))


def calls(program, target) -> int:
    return sum(n.target is target for n in program.exported.graph.nodes)


def close(actual, expected) -> None:
    """Two runs of the same bf16 maths: every attention output within 2u|v| of exact attention either way
    (tests/kernels/test_cpu_attention.py), u = 2^-8, through the fixture's two layers; a wrong key, mask or
    head would move the outputs by their own size."""
    actual, expected = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    assert len(actual) == len(expected) > 0
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e.float(), atol=8 * 2.0**-8 * float(e.float().abs().max()), rtol=0)


@needs_kernel
def test_every_attention_runs_the_kernel_with_the_steps_logits(step, checkpoints):
    rewritten = cpu_attention(step, CpuAttention()).program
    check_program(rewritten)
    layers = calls(step, _SDPA)
    assert layers > 0 and calls(rewritten, _SDPA) == 0 and calls(rewritten, kernel.attention) == layers
    assert rewritten.signature.kernels == ("cpu_attention",) and step.signature.kernels == ()
    inputs = padded_batch([9, 6], 12)  # left padding: the key mask matters
    (expected,), (actual,) = (torch.utils._pytree.tree_leaves(p.exported.module()(*inputs)) for p in (step, rewritten))
    close(actual, expected)  # [B, L, V] logits
    # as close to the same weights run in float64 as ATen's attention is (on the real rows: padding rows
    # attend to themselves only)
    exact = load_model(checkpoints["llada"], dtype=torch.bfloat16).double()(*inputs)  # [B, L, V]
    real = inputs[1]  # [B, L]
    error = {name: float((out.double() - exact)[real].abs().max()) for name, out in (("sdpa", expected), ("kernel", actual))}
    assert error["kernel"] <= 1.5 * error["sdpa"] + 2.0**-8 * float(exact.abs().max()), error


@needs_kernel
def test_a_cached_step_attends_over_cache_and_fresh_keys(step):
    dual = block_cache(step, BlockCache(mode="dual", block_length=4)).program
    rewritten = cpu_attention(dual, CpuAttention()).program
    assert calls(rewritten, _SDPA) == 0 and rewritten.signature.cache == dual.signature.cache
    generator = torch.Generator().manual_seed(0)
    ids, mask, positions = padded_batch([4, 3], 4)
    spec = {t.name: t for t in dual.signature.inputs}["cache_keys"]
    layers, _, heads, _, dim = spec.shape
    keys, values = (torch.randn(layers, 2, heads, 10, dim, generator=generator).bfloat16() for _ in range(2))
    cache_mask = torch.rand(2, 10, generator=generator) > 0.3  # [B, C]
    cache_positions = torch.arange(10).expand(2, -1) + 4  # [B, C]
    inputs = (ids, mask, positions, cache_mask, cache_positions, keys, values)
    expected, actual = dual.exported.module()(*inputs), rewritten.exported.module()(*inputs)
    assert len(torch.utils._pytree.tree_leaves(actual)) == 3  # logits, and the fresh K/V the cache keeps
    close(actual, expected)


def test_a_cpu_without_the_instructions_is_refused_or_keeps_sdpa(step, monkeypatch):
    monkeypatch.setattr(kernel, "missing_cpu_flags", lambda: ["avx512_bf16"])
    with pytest.raises(DlmcError, match="this CPU lacks avx512_bf16.*fallback: sdpa"):
        cpu_attention(step, CpuAttention())
    kept = cpu_attention(step, CpuAttention(fallback="sdpa"))
    assert kept.program is step and not kept.modified


@needs_kernel
def test_float32_steps_are_refused(checkpoints):
    fp32 = capture(load_model(checkpoints["llada"]), CaptureConfig(max_batch=2))
    with pytest.raises(DlmcError, match="runs in torch.float32; the kernel is for bfloat16 steps"):
        cpu_attention(fp32, CpuAttention())


def test_recipe_order_and_options_are_checked():
    with pytest.raises(DlmcError, match="cpu_attention must come after block_cache"):
        parse_recipe({"passes": [{"cpu_attention": {}}, {"block_cache": {}}]}, "r.yaml")
    with pytest.raises(DlmcError, match="fallback"):
        parse_recipe({"passes": [{"cpu_attention": {"fallback": "maybe"}}]}, "r.yaml")
    with pytest.raises(DlmcError, match="signature.kernels: unknown kernel 'warp'"):
        load_kernels(("warp",))


@needs_kernel
def test_an_aotinductor_artifact_calls_the_kernel_and_decodes_the_eager_tokens(tmp_path):
    """The embedded model under cpu-bf16-dual.yaml: the package calls the kernel through the dispatcher, the
    runtime loads it from the signature, and the tokens agree with the same recipe on ATen's attention,
    lowered eagerly. Agree, not equal: in bf16 some of the model's logits tie exactly (filler positions), and
    another attention kernel's rounding may break a tie the other way; a wrong kernel would agree on few."""
    recipe = load_recipe("recipes/cpu-bf16-dual.yaml")
    assert "cpu_attention" in [p.name for p in recipe.passes]
    plain = dataclasses.replace(recipe, passes=tuple(p for p in recipe.passes if p.name != "cpu_attention"),
                                lower=EagerSettings())
    compiled = compile_model(default_model_dir(), recipe, tmp_path / "kernel")
    assert json.loads((compiled / "manifest.json").read_text())["signature"]["kernels"] == ["cpu_attention"]
    engines = [dlmc.runtime.load(compiled),
               dlmc.runtime.load(compile_model(default_model_dir(), plain, tmp_path / "sdpa"))]
    prompts = [[int(t) for t in engines[0].tokenizer.encode(p)] for p in ("add 123+456:", "count 417:")]
    config = LLaDAConfig(gen_length=32, steps=32, block_length=16)
    kernel_tokens, sdpa_tokens = (torch.tensor(e.generate(prompts, "llada", config).output_ids) for e in engines)
    assert (kernel_tokens == sdpa_tokens).float().mean() >= 0.9  # [B, 32]
