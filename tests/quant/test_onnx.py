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
    calibration = Calibration(samples=4, seq_len=16)
    return step, calibration_inputs(calibration, model.spec, checkpoints["llada"], 256, model=model)


def _lower(program, **settings):
    import onnx

    from dlmc.lower.onnxrt import MODEL_FILE, OnnxRtSettings, lower

    step = lower(program, OnnxRtSettings(opset=21, **settings), "cpu")
    model = onnx.load(f"{step._workdir.name}/{MODEL_FILE}", load_external_data=False)
    return step, model


def _op_counts(model):
    return Counter(n.op_type for n in model.graph.node)


def test_weight_only_lowers_to_int4_qdq_and_dequantizelinear(llada):
    from onnx import TensorProto

    step, batches = llada
    program = quantize_program(step, WEIGHT_ONLY, batches)[0].program
    lowered, model = _lower(program)
    ops = _op_counts(model)
    assert ops["MatMulNBits"] == 0
    assert ops["DequantizeLinear"] == 4 * 2 + 3 * 2  # q, k, v, o: int4; gate (grouped, asymmetric), up, down: int8
    int4 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT4]
    assert len(int4) == 4 * 2 and all(i.data_location == TensorProto.EXTERNAL for i in int4)
    assert "com.microsoft" not in {o.domain for o in model.opset_import}
    inputs = padded_batch([9, 6], 9, vocab=272)
    torch.testing.assert_close(lowered(*inputs), program(*inputs), rtol=1e-4, atol=1e-4)


def test_int4_qdq_weights_are_the_matmulnbits_codes(llada):
    """The int4 DequantizeLinear holds W^T with codes - 8 (signed, no zero point): dequantized by hand
    from the external bytes it equals the stored weight; MatMulNBits, kept on request, gives the same logits."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    from dlmc.quant.ops import dequantize_weight

    step, batches = llada
    program = quantize_program(step, WEIGHT_ONLY, batches)[0].program
    lowered, model = _lower(program)
    nbits, nbits_model = _lower(program, int4="matmulnbits")
    assert _op_counts(nbits_model)["MatMulNBits"] == 4 * 2
    inputs = padded_batch([9, 6], 9, vocab=272)
    torch.testing.assert_close(lowered(*inputs), nbits(*inputs), rtol=1e-5, atol=1e-5)

    state = program.exported.state_dict
    init = {i.name: i for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "q_proj" in n.input[0]
              and init[n.input[0]].data_type == TensorProto.INT4)
    weight, scale = init[dq.input[0]], numpy_helper.to_array(init[dq.input[1]])  # scale [K / block, N]
    location = {e.key: e.value for e in weight.external_data}
    raw = np.fromfile(f"{lowered._workdir.name}/{location['location']}", dtype=np.uint8,
                      count=int(location["length"]), offset=int(location["offset"]))
    nibbles = np.stack((raw & 15, raw >> 4), -1).reshape(-1).astype(np.int8)
    codes = np.where(nibbles > 7, nibbles - 16, nibbles).reshape(weight.dims)  # [K, N] signed
    block = next(a.i for a in dq.attribute if a.name == "block_size")
    w_t = codes * np.repeat(scale, block, axis=0)  # [K, N]
    layer = "layers.0.attn.q_proj"
    stored = dequantize_weight(state[f"{layer}.qweight"], state[f"{layer}.scale"], None, 4)  # [N, K]
    np.testing.assert_allclose(w_t, stored.T.numpy(), rtol=0, atol=1e-7)


def test_w8a8_lowers_to_qdq_and_matmulinteger(llada):
    from dlmc.compiler import ACT_QUANT_TOLERANCE

    step, batches = llada
    program = quantize_program(step, W8A8, batches)[0].program
    lowered, model = _lower(program)
    ops = _op_counts(model)
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
    assert "int4 DequantizeLinear, which needs opset >= 21" in unsupported(Scheme(weights="int4", group_size=32), 20)[0]
    assert unsupported(Scheme(weights="int4", group_size=32), 20, int4="matmulnbits") == []
    assert "opset >= 21" in unsupported(Scheme(), 20)[0]
    assert unsupported(Scheme(activations="per_token"), 20) == []
    recipe = {
        "passes": [{"quantize": {"scheme": {"weights": "int4", "group_size": 24}}}],
        "lower": {"backend": "onnxrt", "opset": 20},
    }
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe)
    assert e.value.problems == [
        "lower.opset: int4 weights lower to blocked int4 DequantizeLinear, which needs opset >= 21 "
        "(or lower.int4: matmulnbits, for ONNX Runtime only)",
        "quantize.group_size: int4 on ONNX (MatMulNBits) needs a power of two >= 16, got 24",
    ]
    parse_recipe(recipe | {"lower": {"backend": "eager"}})  # the eager backend runs any scheme
