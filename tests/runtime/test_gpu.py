"""The CUDA path end to end (skipped without a GPU; scripts/gpu_check.sh runs them): every backend's
exact recipe gives the reference decoder's tokens on CUDA, as the CPU tests check on the CPU. The
reference runs the same checkpoint eagerly on the same GPU, in the same dtype."""

import importlib.util

import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding import DECODERS, default_decoder
from dlmc.models import load_model
from dlmc.quant import ops
from dlmc.recipe import parse_recipe

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]


def has_ort_cuda() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def reference(model_dir, prompts, device="cuda"):
    model = load_model(model_dir, device=device)
    name = default_decoder(model.spec)
    config_type, generate = DECODERS[name]
    config = config_type(gen_length=8, steps=8, block_length=8) if name == "llada" else config_type(gen_length=8)
    return name, config, generate(model, model.spec, prompts, config)


def exact(backend, *passes):
    return parse_recipe({"passes": [{"fold_constants": {}}, *passes], "lower": {"backend": backend}}, "gpu")


@pytest.mark.parametrize("backend", [
    "eager", "inductor",
    pytest.param("onnxrt", marks=pytest.mark.skipif(not has_ort_cuda(), reason="needs onnxruntime-gpu")),
])
def test_exact_recipe_gives_the_reference_tokens_on_cuda(backend, checkpoints, tmp_path):
    out = compile_model(checkpoints["llada"], exact(backend), tmp_path / "out", device="cuda")
    engine = dlmc.runtime.load(out, device="cuda")
    name, config, expected = reference(checkpoints["llada"], PROMPTS)
    assert engine.generate(PROMPTS, name, config).output_ids == expected.output_ids


def test_cuda_n_runs_on_that_gpu(checkpoints, tmp_path):
    last = f"cuda:{torch.cuda.device_count() - 1}"
    out = compile_model(checkpoints["llada"], exact("inductor"), tmp_path / "out", device=last)
    engine = dlmc.runtime.load(out, device=last)
    name, config, expected = reference(checkpoints["llada"], PROMPTS, device=last)
    assert engine.generate(PROMPTS, name, config).output_ids == expected.output_ids


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_the_cache_manager_gives_the_reference_tokens_on_cuda(backend, checkpoints, tmp_path):
    """causal_cache is exact: the cache manager serves each step from the committed blocks' K/V."""
    out = compile_model(checkpoints["sdar"], exact(backend, {"causal_cache": {}}), tmp_path / "out", device="cuda")
    engine = dlmc.runtime.load(out, device="cuda")
    name, config, expected = reference(checkpoints["sdar"], PROMPTS)
    assert engine.generate(PROMPTS, name, config).output_ids == expected.output_ids


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_w8a8_operator_on_cuda_matches_the_cpu(rows):
    """Few rows (a cached step) take the padded int8 GEMM; the int32 sums are exact on both devices,
    so only the fp32 rescale can differ, by rounding."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 72, generator=g)  # [rows, in]: in not a multiple of 16
    q8 = torch.randint(-127, 128, (20, 72), generator=g, dtype=torch.int8)  # [out, in]: out not a multiple of 8
    scale = torch.rand(20, 1, generator=g) / 100
    cpu = ops.linear_w8a8(x, q8, scale, None, None)
    gpu = ops.linear_w8a8(x.cuda(), q8.cuda(), scale.cuda(), None, None)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    half = ops.linear_w8a8(x.cuda().half(), q8.cuda(), scale.cuda().half(), None, None)
    assert torch.isfinite(half).all()


def test_w4a16_and_w8a8_steps_compile_and_run_on_cuda(checkpoints, tmp_path):
    for scheme in ({"weights": "int4", "group_size": 16}, {"activations": "per_token"}):
        quantize = {"quantize": {"scheme": scheme, "rules": [{"match": "lm_head", "scheme": None}],
                                 "calibration": {"source": "random", "samples": 4, "seq_len": 16}}}
        out = compile_model(checkpoints["llada"], exact("inductor", quantize), tmp_path / str(len(scheme)),
                            device="cuda")
        engine = dlmc.runtime.load(out, device="cuda")
        result = engine.generate(PROMPTS[:1], config=reference(checkpoints["llada"], PROMPTS[:1])[1])
        assert len(result.output_ids[0]) > 0
