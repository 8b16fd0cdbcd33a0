"""CUDA graphs for the fused loop: the choice (CPU-checkable), and on a GPU token identity with the
plain path (gpu-marked; scripts/gpu_check.sh runs them)."""

from types import SimpleNamespace

import pytest
import torch

import dlmc.runtime
import dlmc.runtime.cuda_graph as cuda_graph
from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.recipe import parse_recipe
from dlmc.runtime.cuda_graph import GraphedStep, step_runner

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]


def fake_engine(device: str, backend: str = "eager"):
    return SimpleNamespace(device=torch.device(device), manifest={"backend": {"name": backend}},
                           run_step=lambda *inputs: inputs)


def test_off_cuda_the_loop_calls_the_step_as_is():
    engine = fake_engine("cpu")
    assert step_runner(engine) is engine.run_step


def test_on_cuda_graphs_for_torch_backends_only(monkeypatch):
    assert isinstance(step_runner(fake_engine("cuda", "inductor")), GraphedStep)
    assert isinstance(step_runner(fake_engine("cuda", "eager")), GraphedStep)
    onnx = fake_engine("cuda", "onnxrt")
    assert step_runner(onnx) is onnx.run_step  # ONNX Runtime launches on its own streams
    monkeypatch.setenv("DLMC_CUDA_GRAPHS", "0")
    engine = fake_engine("cuda", "inductor")
    assert step_runner(engine) is engine.run_step


def test_a_graph_off_cuda_is_one_line_error():
    with pytest.raises(DlmcError) as e:
        GraphedStep(lambda *a: a, "cpu")
    assert "\n" not in str(e.value) and "'cpu'" in str(e.value)


@pytest.mark.gpu
def test_replay_gives_the_calls_results_and_captures_each_shape_once():
    def run(x, w):
        return x @ w, x.sum(-1)

    graphed = GraphedStep(run, "cuda")
    w = torch.randn(16, 8, device="cuda")
    for rows in (3, 3, 5, 3):
        x = torch.randn(rows, 16, device="cuda")
        for got, want in zip(graphed(x, w), run(x, w)):
            assert torch.equal(got, want)  # the same kernels on the same inputs
    assert graphed.captures == 2


def fused_recipe(backend: str, *extra):
    cache = [{"block_cache": {"mode": "dual", "block_length": 4}}] if "dual" in extra else []
    kernels = [{"triton_kernels": {"head": True, "attention": bool(cache)}}] if "kernels" in extra else []
    return parse_recipe({"passes": [*cache, {"fuse_decode": {}}, *kernels], "lower": {"backend": backend}}, "gpu")


def generate(out, monkeypatch, graphs: bool):
    monkeypatch.setenv("DLMC_CUDA_GRAPHS", "1" if graphs else "0")
    made = []
    monkeypatch.setattr("dlmc.runtime.loop.step_runner", lambda engine: made.append(cuda_graph.step_runner(engine))
                        or made[-1])
    engine = dlmc.runtime.load(out, device="cuda")
    config = LLaDAConfig(gen_length=8, steps=8, block_length=4)
    ids = engine.generate(PROMPTS, "llada", config).output_ids
    assert isinstance(made[0], GraphedStep) == graphs and (not graphs or made[0].captures > 0)
    return ids


@pytest.mark.gpu
@pytest.mark.parametrize("backend, cache", [("eager", "uncached"), ("eager", "dual"), ("inductor", "dual")])
def test_graphs_give_the_plain_loops_tokens(backend, cache, checkpoints, tmp_path, monkeypatch):
    out = compile_model(checkpoints["llada"], fused_recipe(backend, cache), tmp_path / "out", device="cuda")
    assert generate(out, monkeypatch, graphs=True) == generate(out, monkeypatch, graphs=False)


@pytest.mark.gpu
def test_triton_kernels_step_gives_the_plain_steps_tokens(checkpoints, tmp_path, monkeypatch):
    """The fused head and the cached attention as Triton kernels inside an AOTInductor package, graphed,
    against the same recipe without them."""
    backend = "inductor"
    plain = compile_model(checkpoints["llada"], fused_recipe(backend, "dual"), tmp_path / "plain", device="cuda")
    kernels = compile_model(checkpoints["llada"], fused_recipe(backend, "dual", "kernels"), tmp_path / "k",
                            device="cuda")
    assert generate(kernels, monkeypatch, graphs=True) == generate(plain, monkeypatch, graphs=False)


@pytest.mark.gpu
def test_w4a16_step_runs_the_woq_kernel(checkpoints, tmp_path, monkeypatch):
    quantize = {"quantize": {"scheme": {"weights": "int4", "group_size": 16}, "rules": [{"match": "lm_head",
                "scheme": None}], "calibration": {"source": "random", "samples": 4, "seq_len": 16}}}
    recipes = {name: parse_recipe({"passes": [quantize, {"fuse_decode": {}}, *extra], "lower": {"backend": "eager"}},
                                  "gpu")
               for name, extra in (("plain", []), ("woq", [{"triton_kernels": {"woq": True, "head": True}}]))}
    outs = {name: compile_model(checkpoints["llada"], r, tmp_path / name, device="cuda") for name, r in recipes.items()}
    assert generate(outs["woq"], monkeypatch, graphs=True) == generate(outs["plain"], monkeypatch, graphs=False)
