import zipfile

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.errors import DlmcError
from dlmc.lower import lower
from dlmc.lower.inductor import InductorSettings
from dlmc.models import load_model
from dlmc.passes.fold_constants import FoldConstants, fold_constants
from dlmc.runtime.backends import load_inductor
from dlmc.testing.fixtures import write_checkpoint
from tests.helpers import padded_batch, rounding_tolerance


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    # One layer keeps the C++ compile short; the per-family runs live in tests/test_compiler.py.
    model_dir = write_checkpoint("sdar", tmp_path_factory.mktemp("sdar1"), layers=1, seed=3)
    step = capture(load_model(model_dir), CaptureConfig(max_batch=4))
    return fold_constants(step, FoldConstants()).program


def test_compiled_package_carries_code_not_weights(program, tmp_path):
    step = lower(program, InductorSettings(), "cpu")
    entry = step.save(tmp_path)
    assert entry["files"] == {"package": "step.pt2", "weights": "weights.safetensors"}
    names = zipfile.ZipFile(tmp_path / "step.pt2").namelist()
    assert any(name.endswith(".so") for name in names)
    assert not any("/data/weights/" in name or "/data/constants/" in name for name in names)
    reloaded = load_inductor(tmp_path, entry, "cpu", "cpu")
    for inputs in (padded_batch([6], 6), padded_batch([3, 21, 21], 21)):
        expected = program(*inputs)
        actual = step(*inputs)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(reloaded(*inputs), actual)

    entry["state"]["parameters"].append("layers.7.attn.q_proj.weight")
    with pytest.raises(DlmcError, match=r"missing tensor 'layers\.7\.attn\.q_proj\.weight'"):
        load_inductor(tmp_path, entry, "cpu", "cpu")
    entry["state"]["parameters"].pop()
    with pytest.raises(DlmcError, match="compiled for cpu"):
        load_inductor(tmp_path, entry, "cuda", "cpu")


def test_bf16_step_is_bit_identical_to_the_captured_one(tmp_path):
    """exact_casts rounds fused intermediates as eager does; without it bf16 logits drift."""
    model_dir = write_checkpoint("llada", tmp_path / "llada", layers=1, hidden=128, intermediate=256, seed=5)
    program = capture(load_model(model_dir, dtype=torch.bfloat16), CaptureConfig(max_batch=2))
    inputs = padded_batch([9, 5], 9)
    expected = program(*inputs)
    assert torch.equal(lower(program, InductorSettings(), "cpu")(*inputs), expected)
    assert not torch.equal(lower(program, InductorSettings(exact_casts=False), "cpu")(*inputs), expected)


def test_frozen_package_carries_prepacked_weights_and_no_safetensors(tmp_path):
    """freeze: the weights are folded into the library (prepacked for the CPU's GEMM library), so the
    artifact names no weights file; another GEMM kernel rounds differently, so up to bf16 rounding."""
    model_dir = write_checkpoint("llada", tmp_path / "llada", layers=1, hidden=128, intermediate=256, seed=5)
    program = capture(load_model(model_dir, dtype=torch.bfloat16), CaptureConfig(max_batch=2))
    step = lower(program, InductorSettings(freeze=True), "cpu")
    entry = step.save(tmp_path)
    assert entry["files"] == {"package": "step.pt2"} and "state" not in entry
    assert not (tmp_path / "weights.safetensors").exists()
    reloaded = load_inductor(tmp_path, entry, "cpu", "cpu")  # nothing to attach
    inputs = padded_batch([9, 5], 9)
    expected = program(*inputs)
    actual = step(*inputs)
    # a random bf16 model's logits are too flat for an arg-max check; closeness is the claim
    tol = rounding_tolerance(torch.bfloat16, 256, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)
    assert torch.equal(reloaded(*inputs), actual)
