import importlib.util

import pytest
import torch
from typer.testing import CliRunner

from dlmc.cli import app
from dlmc.errors import DlmcError
from dlmc.compiler import compile_model
from dlmc.recipe import parse_recipe

runner = CliRunner()
W8A8_ONNX = {
    "capture": {"max_batch": 2},
    "passes": [{"quantize": {"scheme": {"activations": "per_tensor", "outliers": "smoothquant"},
                             "rules": [{"match": "lm_head", "scheme": None}],
                             "calibration": {"source": "random", "samples": 4, "seq_len": 16}}}],
    "lower": {"backend": "onnxrt", "opset": 21},
}
W4A16_ONNX = W8A8_ONNX | {
    "passes": [{"quantize": {"scheme": {"weights": "int4", "group_size": 16},
                             "rules": [{"match": "lm_head", "scheme": None}],
                             "calibration": {"source": "random", "samples": 4, "seq_len": 16}}}],
}


@pytest.fixture(scope="module")
def qdq_artifact(checkpoints, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return compile_model(checkpoints["llada"], parse_recipe(W8A8_ONNX), tmp_path_factory.mktemp("trt") / "out")


def test_build_engine_without_tensorrt_or_gpu_is_one_line(qdq_artifact):
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: the gpu test builds the engine")
    result = runner.invoke(app, ["build-engine", str(qdq_artifact)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "TensorRT is not installed" in result.stderr or "no CUDA device" in result.stderr
    assert not qdq_artifact.with_name(qdq_artifact.name + ".engine").exists()


@pytest.fixture(scope="module")
def int4_artifact(checkpoints, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return compile_model(checkpoints["llada"], parse_recipe(W4A16_ONNX), tmp_path_factory.mktemp("trt4") / "out")


def test_int4_graphs_reach_tensorrt_as_qdq_and_matmulnbits_is_refused(int4_artifact, checkpoints, tmp_path):
    from dlmc.lower.tensorrt_engine import onnx_graph_of

    onnx_graph_of(int4_artifact)  # int4 DequantizeLinear + MatMul: what TensorRT parses
    recipe = W4A16_ONNX | {"lower": {"backend": "onnxrt", "opset": 21, "int4": "matmulnbits"}}
    nbits = compile_model(checkpoints["llada"], parse_recipe(recipe), tmp_path / "nbits")
    result = runner.invoke(app, ["build-engine", str(nbits)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "MatMulNBits, which TensorRT cannot parse" in result.stderr and "lower.int4: qdq" in result.stderr


def test_build_engine_refuses_an_artifact_without_onnx(checkpoints, tmp_path):
    out = compile_model(checkpoints["llada"], "recipes/cpu-eager.yaml", tmp_path / "eager")
    result = runner.invoke(app, ["build-engine", str(out)])
    assert result.exit_code == 2 and "needs an artifact compiled with lower.backend: onnxrt" in result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("artifact", ["qdq_artifact", "int4_artifact"])
def test_build_engine_on_a_gpu(artifact, request):
    pytest.importorskip("tensorrt")
    artifact = request.getfixturevalue(artifact)
    result = runner.invoke(app, ["build-engine", str(artifact)])
    assert result.exit_code == 0, result.output
    assert artifact.with_name(artifact.name + ".engine").stat().st_size > 0
    import dlmc.runtime

    dlmc.runtime.load(artifact)  # the artifact itself is untouched


def test_profiles_cover_a_cached_steps_five_dim_inputs_at_realistic_shapes():
    from dlmc.lower.tensorrt_engine import profile_shapes

    def spec(name, *shape):
        return {"name": name, "dtype": "float16", "shape": list(shape)}

    manifest = {"signature": {
        "batch": [1, 8], "seq": [2, 1024], "cache": {"policy": "dual", "block_length": 32},
        "inputs": [spec("input_ids", "batch", "seq"), spec("cache_mask", "batch", "cache"),
                   spec("cache_keys", 4, "batch", 2, "cache", 64)],
    }}
    shapes = profile_shapes(manifest, opt_batch=8)
    assert shapes["input_ids"] == ((1, 2), (8, 32), (8, 1024))  # queries: one block
    assert shapes["cache_mask"] == ((1, 1), (8, 256), (8, 1024))
    assert shapes["cache_keys"] == ((4, 1, 2, 1, 64), (4, 8, 2, 256, 64), (4, 8, 2, 1024, 64))
    manifest["signature"]["inputs"].append(spec("odd", "batch", "experts"))
    with pytest.raises(DlmcError, match="input odd has a dim 'experts'"):
        profile_shapes(manifest)


@pytest.mark.parametrize("version, exact", [("8.5.2", False), ("10.3.0", False), ("10.3.0", True), ("8.5.2", True)])
def test_network_flags_for_tensorrt_8_and_10(version, exact):
    from types import SimpleNamespace

    from dlmc.lower.tensorrt_engine import network_flags

    flags = SimpleNamespace(EXPLICIT_BATCH=0) if version.startswith("8") else SimpleNamespace(STRONGLY_TYPED=1)
    trt = SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags)
    if exact and version.startswith("8"):
        with pytest.raises(DlmcError, match="strongly typed networks need 9.0"):
            network_flags(trt, exact)
        return
    expected = (1 if version.startswith("8") else 0) | (2 if exact else 0)
    assert network_flags(trt, exact) == expected


@pytest.mark.parametrize("exact, fp16, calls", [(True, True, [("clear", "TF32")]), (False, True, [("set", "FP16")]),
                                                (False, False, [])])
def test_an_exact_engine_gets_no_tf32_and_no_fp16(exact, fp16, calls):
    from types import SimpleNamespace

    from dlmc.lower.tensorrt_engine import set_precision

    seen = []
    config = SimpleNamespace(set_flag=lambda f: seen.append(("set", f)), clear_flag=lambda f: seen.append(("clear", f)))
    set_precision(SimpleNamespace(BuilderFlag=SimpleNamespace(TF32="TF32", FP16="FP16")), config, exact, fp16)
    assert seen == calls
