"""The ONNX lowering of quantized steps: valid graphs (onnx.checker runs inside the lowering), the
expected quantized operators, logits that match the torch quantized step, and refused schemes."""

from collections import Counter

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.models import load_model
from dlmc.passes.quantize import Quantize, quantize_program
from dlmc.quant.calibration import calibration_inputs
from dlmc.quant.onnx import unsupported
from dlmc.quant.scheme import Calibration, Rule, Scheme
from dlmc.recipe import RecipeError, parse_recipe
from tests.helpers import padded_batch

pytest.importorskip("onnxruntime")

WEIGHT_ONLY = Quantize(
    scheme=Scheme(),  # int8 per channel
    rules=(Rule(match="lm_head", scheme=None), Rule(match="*.attn.*", scheme=Scheme(weights="int4", group_size=32)),
           Rule(match="*.gate_proj", scheme=Scheme(group_size=32, symmetric=False))),
    calibration=Calibration(samples=4, seq_len=16),
)
W8A8 = Quantize(
    scheme=Scheme(activations="per_token", outliers="hadamard"),
    rules=(Rule(match="lm_head", scheme=None),
           Rule(match="*.attn.*", scheme=Scheme(activations="per_tensor", outliers="smoothquant"))),
    calibration=Calibration(samples=4, seq_len=16),
)


@pytest.fixture(scope="module")
def llada(checkpoints):
    model = load_model(checkpoints["llada"])
    step = capture(model, CaptureConfig(max_batch=4))
    return step, calibration_inputs(Calibration(samples=4, seq_len=16), model.spec, checkpoints["llada"], 256)


def _lower(program):
    import onnx

    from dlmc.lower.onnxrt import MODEL_FILE, OnnxRtSettings, lower

    step = lower(program, OnnxRtSettings(opset=21), "cpu")
    model = onnx.load(f"{step._workdir.name}/{MODEL_FILE}", load_external_data=False)
    return step, Counter(n.op_type for n in model.graph.node)


def test_weight_only_lowers_to_matmulnbits_and_dequantizelinear(llada):
    step, batches = llada
    program = quantize_program(step, WEIGHT_ONLY, batches)[0].program
    lowered, ops = _lower(program)
    assert ops["MatMulNBits"] == 4 * 2  # q, k, v, o in 2 layers: int4
    assert ops["DequantizeLinear"] == 3 * 2  # gate (grouped, asymmetric), up, down: int8
    inputs = padded_batch([9, 6], 9, vocab=272)
    expected = program(*inputs)
    torch.testing.assert_close(lowered(*inputs), expected, rtol=1e-4, atol=1e-4)


def test_w8a8_lowers_to_qdq_and_matmulinteger(llada):
    from dlmc.compiler import ACT_QUANT_TOLERANCE

    step, batches = llada
    program = quantize_program(step, W8A8, batches)[0].program
    lowered, ops = _lower(program)
    assert ops["QuantizeLinear"] == 4 * 2  # attention: static per-tensor activations, QDQ
    assert ops["MatMulInteger"] == 3 * 2  # MLP: per-token dynamic activations
    inputs = padded_batch([9, 6], 9, vocab=272)
    expected = program(*inputs)
    actual = lowered(*inputs)
    # int8 activations: a last-bit difference upstream can move one activation by a whole step
    assert ((actual - expected).abs() / (1 + expected.abs())).max() < ACT_QUANT_TOLERANCE
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_schemes_onnx_cannot_run_are_refused_when_the_recipe_is_read():
    assert unsupported(Scheme(weights="int4", group_size=32), 21) == []
    assert "symmetric: true" in unsupported(Scheme(weights="int4", group_size=32, symmetric=False), 21)[0]
    assert "power of two >= 16, got 24" in unsupported(Scheme(weights="int4", group_size=24), 21)[0]
    assert "opset >= 21" in unsupported(Scheme(), 20)[0]
    assert unsupported(Scheme(activations="per_token"), 20) == []
    recipe = {
        "passes": [{"quantize": {"scheme": {"weights": "int4", "group_size": 24}}}],
        "lower": {"backend": "onnxrt", "opset": 20},
    }
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe)
    assert e.value.problems == [
        "quantize.group_size: int4 on ONNX (MatMulNBits) needs a power of two >= 16, got 24"
    ]
    parse_recipe(recipe | {"lower": {"backend": "eager"}})  # the eager backend runs any scheme
