import importlib.util

import pytest
import torch

from dlmc.compiler import compile_model
from dlmc.decoding import DECODERS, default_decoder
from dlmc.errors import DlmcError
from dlmc.lower import check_backend
from dlmc.lower.tensorrt import TensorRtSettings
from dlmc.models import load_model
from dlmc.recipe import Recipe

HAS_TRT = importlib.util.find_spec("torch_tensorrt") is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_choosing_tensorrt_without_a_gpu_fails_with_one_line_and_no_output(checkpoints, tmp_path):
    with pytest.raises(DlmcError) as info:
        compile_model(checkpoints["llada"], Recipe(lower=TensorRtSettings()), tmp_path / "out")
    message = str(info.value)
    assert "tensorrt runs only on a CUDA device" in message and "\n" not in message
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_TRT, reason="checks the missing-package message")
def test_missing_torch_tensorrt_names_the_extra():
    assert any("pip install 'dlmc[trt]'" in p for p in check_backend(TensorRtSettings(), "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs torch_tensorrt (pip install 'dlmc[trt]')")
def test_tensorrt_artifact_runs_the_reference_decoder(checkpoints, tmp_path):
    import dlmc.runtime

    model_dir = checkpoints["llada"]
    recipe = Recipe(lower=TensorRtSettings(opt_batch=2, opt_seq=32, min_block_size=1))
    out = compile_model(model_dir, recipe, tmp_path / "out", device="cuda")
    engine = dlmc.runtime.load(out)
    model = load_model(model_dir, device="cuda")
    config_type, generate = DECODERS[default_decoder(model.spec)]
    config = config_type(gen_length=8, steps=8, block_length=8)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    expected = generate(model, model.spec, prompts, config)
    assert engine.generate(prompts, config=config).output_ids == expected.output_ids


class _FakeTorchTensorRt:
    """Records what TensorRtStep hands torch_tensorrt (no GPU here: nothing is built)."""

    def __init__(self):
        self.inputs, self.compile_kwargs = [], {}
        outer = self

        class Input:
            def __init__(self, **kwargs):
                outer.inputs.append(kwargs)

        class Dynamo:
            @staticmethod
            def compile(exported, **kwargs):
                outer.compile_kwargs = kwargs
                return "compiled"

        self.Input, self.dynamo = Input, Dynamo


def test_the_build_asks_for_explicit_precision_and_a_realistic_profile(checkpoints, monkeypatch):
    import sys

    from dlmc.capture import CaptureConfig, capture
    from dlmc.lower.tensorrt import TensorRtStep

    fake = _FakeTorchTensorRt()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    program = capture(load_model(checkpoints["llada"]), CaptureConfig(max_batch=4))
    TensorRtStep(program, TensorRtSettings(), "meta")  # meta stands in for the GPU: nothing runs on it
    assert fake.compile_kwargs["use_explicit_typing"] and fake.compile_kwargs["disable_tf32"]
    longest = program.signature.seq[1]
    for spec in fake.inputs:
        assert spec["max_shape"] == (4, longest) and spec["opt_shape"] == (1, min(256, longest))
