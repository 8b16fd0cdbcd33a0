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


def test_build_engine_refuses_an_artifact_without_onnx(checkpoints, tmp_path):
    out = compile_model(checkpoints["llada"], "recipes/cpu-eager.yaml", tmp_path / "eager")
    result = runner.invoke(app, ["build-engine", str(out)])
    assert result.exit_code == 2 and "needs an artifact compiled with lower.backend: onnxrt" in result.stderr


@pytest.mark.gpu
def test_build_engine_on_a_gpu(qdq_artifact):
    pytest.importorskip("tensorrt")
    result = runner.invoke(app, ["build-engine", str(qdq_artifact)])
    assert result.exit_code == 0, result.output
    assert qdq_artifact.with_name(qdq_artifact.name + ".engine").stat().st_size > 0
    import dlmc.runtime

    dlmc.runtime.load(qdq_artifact)  # the artifact itself is untouched
