import onnx
import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.errors import DlmcError
from dlmc.lower import check_backend, lower
from dlmc.lower.onnxrt import OnnxRtSettings
from dlmc.models import load_model
from dlmc.passes.fold_constants import FoldConstants, fold_constants
from dlmc.runtime.backends import load_onnxrt, open_session
from tests.helpers import padded_batch


@pytest.fixture(scope="module")
def program(checkpoints):
    step = capture(load_model(checkpoints["sdar"]), CaptureConfig(max_batch=4))
    return fold_constants(step, FoldConstants()).program


@pytest.fixture(scope="module")
def saved(program, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    step = lower(program, OnnxRtSettings(), "cpu")
    return step, step.save(directory), directory


def test_model_is_standard_onnx_with_weights_in_safetensors(saved):
    _, entry, directory = saved
    path = directory / entry["files"]["model"]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(
        {e.key: e.value for e in i.external_data}["location"] == "weights.safetensors" for i in external
    )
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", "seq"]] * 3
    assert path.stat().st_size < (directory / "weights.safetensors").stat().st_size


def test_runs_like_the_program_and_reloads(program, saved):
    step, entry, directory = saved
    reloaded = load_onnxrt(directory, entry, "cpu", "cpu")
    for inputs in (padded_batch([5], 5), padded_batch([2, 17, 17], 17)):
        expected = program(*inputs)
        torch.testing.assert_close(step(*inputs), expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(reloaded(*inputs), step(*inputs))


def test_a_provider_that_cannot_start_is_refused_not_swapped_for_the_cpu(saved):
    _, entry, directory = saved
    with pytest.raises(DlmcError, match=r"could not start|not available|cannot load"):
        open_session(directory / entry["files"]["model"], ("CUDAExecutionProvider",), "all", "cpu")


def test_bfloat16_is_refused_on_the_cpu_provider():
    (problem,) = check_backend(OnnxRtSettings(), "cpu", frozenset({"bfloat16"}))
    assert "no bfloat16 MatMul" in problem
    assert check_backend(OnnxRtSettings(), "cpu", frozenset({"float16", "float32"})) == []
