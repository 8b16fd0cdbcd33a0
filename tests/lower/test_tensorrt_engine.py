import importlib.util

import pytest
import torch
from typer.testing import CliRunner

from dlmc.cli import app
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
