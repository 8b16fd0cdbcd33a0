import pytest
import torch

from dlmc.capture import CaptureConfig, capture, example_inputs, experts_form
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.testing.fixtures import FAMILIES
from tests.helpers import assert_equal_up_to_rounding, padded_batch


@pytest.fixture(scope="module")
def captured(checkpoints):
    """family -> (model, its step captured with max_batch=4), each captured once for the module."""
    cache = {}

    def get(family):
        if family not in cache:
            model = load_model(checkpoints[family])
            cache[family] = model, capture(model, CaptureConfig(max_batch=4))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_step_is_bitwise_eager_for_every_shape(family, captured):
    model, program = captured(family)
    for inputs in (padded_batch([5], 5), padded_batch([3, 13, 13], 13), padded_batch([2, 40], 40)):
        with torch.no_grad():
            assert torch.equal(program(*inputs), model(*inputs))


def test_signature_records_the_step_interface(captured):
    model, program = captured("sdar")
    sig = program.signature
    assert [t.name for t in sig.inputs] == ["input_ids", "attention_mask", "position_ids"]
    assert [t.dtype for t in sig.inputs] == ["int64", "bool", "int64"]
    assert sig.outputs[0].name == "logits" and sig.outputs[0].dtype == "float32"
    assert sig.outputs[0].shape == ("batch", "seq", model.spec.vocab_size)
    assert sig.batch == (1, 4) and sig.seq == (2, model.spec.max_length)


def test_nodes_keep_their_module_path(captured):
    _, program = captured("llada")
    linears = [n for n in program.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    owners = {list(n.meta["nn_module_stack"].values())[-1][0] for n in linears}
    assert "layers.1.attn.q_proj" in owners and "layers.0.mlp.down_proj" in owners


def test_buckets_bound_the_sequence_range(checkpoints):
    program = capture(load_model(checkpoints["llada"]), CaptureConfig(seq_buckets=(16, 32)))
    assert program.signature.seq == (2, 32) and program.signature.seq_buckets == (16, 32)
    with pytest.raises(DlmcError, match="seq_buckets"):
        capture(load_model(checkpoints["llada"]), CaptureConfig(seq_buckets=(16, 4096)))


def test_batch_one_artifacts_have_a_static_batch(checkpoints):
    model = load_model(checkpoints["dream"])
    program = capture(model, CaptureConfig(max_batch=1))
    inputs = example_inputs(batch=1, seq=9)
    assert program.signature.batch == (1, 1)
    assert torch.equal(program(*inputs), model(*inputs))


@pytest.mark.parametrize("bad", [dict(max_batch=0), dict(seq_buckets=(8, 4)), dict(seq_buckets=(1,))])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        CaptureConfig(**bad)


@torch.library.custom_op("dlmc_test::opaque_norm", mutates_args=())
def opaque_norm(x: torch.Tensor) -> torch.Tensor:
    """An op with no fake (meta) implementation: torch.export cannot trace through it."""
    return x.clone()


def test_unexportable_model_names_the_op(checkpoints, monkeypatch):
    model = load_model(checkpoints["llada"])
    norm = model.layers[0].mlp_norm
    monkeypatch.setattr(norm, "forward", lambda x: opaque_norm(x))
    with pytest.raises(DlmcError) as info:
        capture(model, CaptureConfig())
    message = str(info.value)
    assert "opaque_norm" in message and "\n" not in message


def test_data_dependent_control_flow_points_at_the_code(checkpoints, monkeypatch):
    model = load_model(checkpoints["dream"])
    mlp = model.layers[1].mlp
    original = mlp.forward

    def branchy_mlp(x):
        if x.sum() > 0:  # a Python branch on a tensor value: export cannot trace it
            return original(x)
        return x

    monkeypatch.setattr(mlp, "forward", branchy_mlp)
    with pytest.raises(DlmcError) as info:
        capture(model, CaptureConfig())
    message = str(info.value)
    assert "data-dependent" in message and "in branchy_mlp)" in message and "\n" not in message


@pytest.mark.parametrize("form", ["grouped", "tiled"])
def test_moe_experts_are_captured_in_the_chosen_form(moe_checkpoints, form):
    model = load_model(moe_checkpoints["llada2"], dtype=torch.float32)
    program = capture(model, CaptureConfig(max_batch=2, moe_experts=form))
    grouped = torch.ops.dlmc.grouped_mm.default in {n.target for n in program.graph_module.graph.nodes}
    assert grouped == (form == "grouped")
    inputs = padded_batch([3, 40], 40)
    with torch.no_grad():
        assert torch.equal(program(*inputs), model(*inputs))  # capture left the model in that form
        other = "tiled" if form == "grouped" else "grouped"
        for layer in model.layers:
            if hasattr(layer.mlp, "form"):
                layer.mlp.form = other
        # the same maths; sums of 64 (hidden) products per projection
        assert_equal_up_to_rounding(model(*inputs)[inputs[1]], program(*inputs)[inputs[1]], 64)


def test_moe_experts_form_follows_the_backend():
    from dlmc.lower.inductor import InductorSettings
    from dlmc.lower.onnxrt import OnnxRtSettings

    assert experts_form(CaptureConfig(), InductorSettings()) == "grouped"
    assert experts_form(CaptureConfig(), OnnxRtSettings()) == "tiled"  # ONNX has no grouped GEMM
    assert experts_form(CaptureConfig(moe_experts="tiled"), InductorSettings()) == "tiled"
