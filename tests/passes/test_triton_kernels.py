"""triton_kernels: the rewritten step calls the dlmc.kernels ops, exports, and (through Triton's interpreter
on CPU, tiny float32 shapes) gives the unrewritten step's outputs up to the kernels' rounding."""

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.errors import DlmcError
from dlmc.kernels import triton_available
from dlmc.models import load_model
from dlmc.passes.block_cache import BlockCache, block_cache
from dlmc.passes.fuse_decode import FuseDecode, fuse_decode
from dlmc.passes.quantize import Quantize, quantize
from dlmc.passes.triton_kernels import TritonKernels, triton_kernels
from dlmc.pipeline import check_program
from dlmc.quant.calibration import Calibration
from dlmc.quant.scheme import Rule, Scheme
from dlmc.recipe import check_target, parse_recipe
from tests.helpers import padded_batch, rounding_tolerance

ROWS = torch.tensor([[4, 7, 8], [5, 6, 8]])  # [B, K]: the head rows
KERNELS = torch.ops.dlmc_kernels
needs_triton = pytest.mark.skipif(
    not triton_available() or torch.cuda.is_available(),
    reason="needs triton, and Triton's interpreter (set by tests/conftest.py only without a GPU; on a GPU "
           "tests/runtime/test_cuda_graph.py runs the rewritten step)")


@pytest.fixture
def interpreter(monkeypatch):
    """The kernel ops run Triton's interpreter on CPU tensors (TRITON_INTERPRET is set in tests/conftest.py)."""
    monkeypatch.setenv("DLMC_TRITON_CPU", "1")


@pytest.fixture(scope="module")
def step(checkpoints):
    return capture(load_model(checkpoints["llada"]), CaptureConfig(max_batch=4))  # float32


@pytest.fixture(scope="module")
def cached(step):
    """The llada step under Fast-dLLM's dual cache with the llada rule fused onto it."""
    dual = block_cache(step, BlockCache(mode="dual", block_length=4)).program
    return fuse_decode(dual, FuseDecode(outputs=("entropy", "margin"))).program


def cache_inputs(program, batch: int, columns: int, seed: int = 0):
    """A random cache of `columns` keys, some of them masked out."""
    generator = torch.Generator().manual_seed(seed)
    spec = {t.name: t for t in program.signature.inputs}["cache_keys"]
    layers, _, heads, _, dim = spec.shape
    keys, values = (torch.randn(layers, batch, heads, columns, dim, generator=generator) for _ in range(2))
    mask = torch.rand(batch, columns, generator=generator) > 0.3  # [B, C]
    positions = torch.arange(columns).expand(batch, -1) + 20  # [B, C]
    return mask, positions, keys, values


def targets(program) -> set:
    return {n.target for n in program.exported.graph.nodes if n.op == "call_function"}


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched (so a test knows the kernels ran, not the references)."""
    import dlmc.kernels.cached_attention as attention
    import dlmc.kernels.unmask_head as head
    import dlmc.kernels.woq_gemm as woq

    seen = []
    kernels = ((head, "unmask_head_triton"), (woq, "linear_woq_triton"), (attention, "cached_attention_triton"))
    for module, name in kernels:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: seen.append(_name) or _real(*a))
    return seen


@needs_triton
def test_head_and_attention_kernels_give_the_steps_outputs(cached, interpreter, launches):
    rewritten = triton_kernels(cached, TritonKernels(head=True, attention=True, cpu_test=True)).program
    check_program(rewritten)
    ops = targets(rewritten)
    assert {KERNELS.unmask_head.default, KERNELS.cached_attention.default} <= ops
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    assert rewritten.signature == cached.signature
    inputs = (*padded_batch([9, 6], 9), *cache_inputs(cached, 2, 5), ROWS)
    expected = cached(*inputs)  # tokens, confidence, confidence64, keys, values
    actual = rewritten(*inputs)
    assert set(launches) == {"unmask_head_triton", "cached_attention_triton"}
    assert [t.name for t in cached.signature.outputs][3:5] == ["entropy", "margin"]
    assert float(expected[4].min()) > 2 * rounding_tolerance(torch.float32, 96, 1.0)  # no near ties
    assert_same_outputs(actual, expected)


def assert_same_outputs(actual, expected):
    """The same tokens, and every float output within the rounding of another float32 summation order."""
    assert [a.dtype for a in actual] == [e.dtype for e in expected]
    assert torch.equal(actual[0], expected[0])
    tol = rounding_tolerance(torch.float32, 96, 1.0)
    for a, e in zip(actual[1:], expected[1:]):
        torch.testing.assert_close(a, e, atol=tol, rtol=0)


@needs_triton
def test_quantized_linears_run_the_woq_kernel(step, interpreter, launches):
    config = Quantize(scheme=Scheme(weights="int4", group_size=32), rules=(Rule(match="lm_head", scheme=None),),
                      calibration=Calibration(samples=8, seq_len=24))
    quantized = quantize(step, config).program
    fused = fuse_decode(quantized, FuseDecode()).program
    rewritten = triton_kernels(fused, TritonKernels(head=True, woq=True, cpu_test=True)).program
    check_program(rewritten)
    ops = targets(rewritten)
    assert KERNELS.linear_woq.default in ops and torch.ops.dlmc.linear_woq.default not in ops
    inputs = (*padded_batch([9, 6], 9), ROWS)
    assert_same_outputs(rewritten(*inputs), fused(*inputs))
    assert {"linear_woq_triton", "unmask_head_triton"} <= set(launches)


def test_a_cpu_program_is_refused_without_the_test_flag(cached):
    with pytest.raises(DlmcError) as e:
        triton_kernels(cached, TritonKernels(head=True))
    assert "\n" not in str(e.value) and "CUDA" in str(e.value) and "'cpu'" in str(e.value)


def test_refusals_name_the_setting(step, cached):
    with pytest.raises(DlmcError, match="choose at least one"):
        TritonKernels()
    with pytest.raises(DlmcError, match="triton_kernels.woq: the step has no weight-only"):
        triton_kernels(cached, TritonKernels(woq=True, cpu_test=True))
    with pytest.raises(DlmcError, match="triton_kernels.attention: the step has no K/V cache"):
        triton_kernels(step, TritonKernels(attention=True, cpu_test=True))
    with pytest.raises(DlmcError, match="triton_kernels.head: the kernel computes the llada rule"):
        triton_kernels(step, TritonKernels(head=True, cpu_test=True))
    sampling = fuse_decode(step, FuseDecode(gumbel=True)).program
    with pytest.raises(DlmcError, match="temperature 0"):
        triton_kernels(sampling, TritonKernels(head=True, cpu_test=True))


def test_recipe_checks():
    kernels = {"triton_kernels": {"head": True}}
    recipe = parse_recipe({"passes": [{"block_cache": {"mode": "dual"}}, {"fuse_decode": {}}, kernels]})
    assert [p.name for p in recipe.passes][-1] == "triton_kernels"
    assert any("triton_kernels runs dlmc's Triton kernels on CUDA, not on 'cpu'" in p
               for p in check_target(recipe, "cpu"))
    assert not [p for p in check_target(recipe, "cuda") if "triton_kernels" in p]
    with pytest.raises(DlmcError, match="triton_kernels must be the last pass"):
        parse_recipe({"passes": [kernels, {"fuse_decode": {}}]})
    with pytest.raises(DlmcError, match="choose at least one"):
        parse_recipe({"passes": [{"triton_kernels": {}}]})


@needs_triton
def test_an_eager_artifact_with_the_kernels_saves_loads_and_decodes(checkpoints, tmp_path, interpreter, launches):
    import dlmc.runtime
    from dlmc.compiler import compile_model
    from dlmc.decoding.llada import LLaDAConfig

    def recipe(*kernels):
        return parse_recipe({"passes": [{"block_cache": {"mode": "dual", "block_length": 4}}, {"fuse_decode": {}},
                                        *kernels], "lower": {"backend": "eager"}})

    config = LLaDAConfig(gen_length=8, steps=8, block_length=4)
    kernels = {"triton_kernels": {"head": True, "attention": True, "cpu_test": True}}
    ids = {}
    for name, r in (("plain", recipe()), ("kernels", recipe(kernels))):
        engine = dlmc.runtime.load(compile_model(checkpoints["llada"], r, tmp_path / name))
        ids[name] = engine.generate([[5, 6, 7], [9, 10, 11, 12, 13]], "llada", config).output_ids
    assert {"unmask_head_triton", "cached_attention_triton"} <= set(launches)
    assert ids["kernels"] == ids["plain"]  # float32: the kernels' rounding is far below this model's margins
