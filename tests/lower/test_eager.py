import json

import pytest
import torch
from safetensors import safe_open

from dlmc.capture import CaptureConfig, capture
from dlmc.lower import lower
from dlmc.lower.eager import EagerSettings
from dlmc.models import load_model
from dlmc.passes.fold_constants import FoldConstants, fold_constants
from dlmc.runtime.backends import load_eager
from tests.helpers import padded_batch


@pytest.fixture(scope="module")
def program(checkpoints):
    step = capture(load_model(checkpoints["fast_dllm_v2"]), CaptureConfig(max_batch=4))
    return fold_constants(step, FoldConstants()).program


def test_lowered_and_reloaded_steps_are_bitwise_the_program(program, tmp_path):
    step = lower(program, EagerSettings(), "cpu")
    entry = step.save(tmp_path)
    assert entry["files"] == {"graph": "step.json", "weights": "weights.safetensors"}
    json.loads((tmp_path / "step.json").read_text())  # the graph is plain JSON, nothing pickled
    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as f:
        names = set(f.keys())
    assert set(entry["state"]["parameters"]) | set(entry["state"]["buffers"]) == names
    assert entry["state"]["buffers"] == ["folded_0"]
    reloaded = load_eager(tmp_path, entry, "cpu", "cpu")
    for inputs in (padded_batch([9], 9), padded_batch([4, 15, 15], 15)):
        expected = program(*inputs)
        assert torch.equal(step(*inputs), expected)
        assert torch.equal(reloaded(*inputs), expected)
