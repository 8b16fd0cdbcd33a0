"""The quantize pass on mixture-of-experts steps: the stacked experts quantized weight-only (RTN), the
router left in float unless a rule names it, W8A8 experts (int8 codes, per-token int8 activations), and the
refusals (GPTQ/AWQ, static activation scales and outlier transforms on experts, the tiled form)."""

import copy
import json

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.passes.quantize import Quantize, quantize_program
from dlmc.pipeline import check_program
from dlmc.quant import ops
from dlmc.quant.calibration import calibration_inputs
from dlmc.quant.formats import rtn, sqnr_db
from dlmc.quant.scheme import Calibration, Rule, Scheme
from tests.helpers import padded_batch

CALIBRATION = Calibration(samples=8, seq_len=24)
W8 = Quantize(scheme=Scheme(), rules=(Rule(match="lm_head", scheme=None),), calibration=CALIBRATION)
W4_EXPERTS = Quantize(scheme=None, rules=(Rule(match="*.experts_*", scheme=Scheme(weights="int4", group_size=32)),),
                      calibration=CALIBRATION)


@pytest.fixture(scope="module", params=["llada_moe", "llada2"])
def moe(request, moe_checkpoints):
    path = moe_checkpoints[request.param]
    model = load_model(path)  # hidden 64, 8 experts of width 32
    step = capture(model, CaptureConfig(max_batch=8))
    return path, model, step, calibration_inputs(CALIBRATION, model.spec, path, 256, model=model)


def _oracle(model, config):
    """The eager model with each expert replaced by RTN applied to it on its own, in the [out, in] layout
    of a linear (written from dlmc.quant.formats, not from the stacked layout the pass stores)."""
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in oracle.named_parameters():
            if ".experts_" not in name:
                continue
            scheme = config.rules[-1].scheme if config.scheme is None else config.scheme
            group = scheme.group_size or param.shape[1]
            for e in range(param.shape[0]):
                w = param[e].T  # [out, in]
                param[e].copy_(rtn(w, scheme.bits, scheme.symmetric, group).dequantize().T)
    return oracle


@pytest.mark.parametrize("config, bound", [(W8, 25), (W4_EXPERTS, 8)], ids=["w8a16", "w4a16-experts"])
def test_quantized_experts_match_the_oracle_and_stay_near_float(moe, config, bound):
    path, model, step, batches = moe
    result, report = quantize_program(step, config, batches)
    program = result.program
    check_program(program)
    nodes = list(program.graph_module.graph.nodes)
    moe_layers = len({k.rpartition(".")[0] for k in step.exported.state_dict if ".experts_" in k})
    assert sum(n.target is ops.grouped_woq for n in nodes) == 3 * moe_layers
    assert not any(n.target is torch.ops.dlmc.grouped_mm.default for n in nodes)
    state = program.exported.state_dict
    assert all(k.endswith((".qweight", ".scale")) for k in state if ".experts_" in k)
    assert any(k.endswith("mlp.router.weight") for k in state)  # the router stays float under a default scheme
    experts = {n: layer for n, layer in report["layers"].items() if ".experts_" in n}
    assert len(experts) == 3 * moe_layers == report["summary"]["expert_layers"]
    assert all(layer["experts"] == 8 and layer["output_sqnr_db"] > bound for layer in experts.values())
    inputs = padded_batch([9, 6], 9)
    with torch.no_grad():
        actual, float_logits = program(*inputs), step(*inputs)
        if config.scheme is None:  # only the experts are quantized: the oracle is exact up to rounding
            torch.testing.assert_close(actual, _oracle(model, config)(*inputs), rtol=1e-4, atol=1e-4)
    assert sqnr_db(float_logits, actual) > bound


def test_w8a8_experts_run_int8_and_stay_near_float(moe):
    """Experts under W8A8 (per-channel int8 codes, per-token int8 activations): one grouped_w8a8 node per
    grouped matmul, codes int8 [E, out, in] and float32 scales [E, out] stored, router and the rest float;
    the logits' SQNR against the float step is reported (the report's layers) and bounded."""
    path, model, step, batches = moe
    config = Quantize(scheme=None, rules=(Rule(match="*.experts_*", scheme=Scheme(activations="per_token")),),
                      calibration=CALIBRATION)
    result, report = quantize_program(step, config, batches)
    program = result.program
    check_program(program)
    nodes = list(program.graph_module.graph.nodes)
    moe_layers = len({k.rpartition(".")[0] for k in step.exported.state_dict if ".experts_" in k})
    assert sum(n.target is ops.grouped_w8a8 for n in nodes) == 3 * moe_layers
    assert not any(n.target in (ops.grouped_woq, torch.ops.dlmc.grouped_mm.default) for n in nodes)
    state = program.exported.state_dict
    codes = [t for k, t in state.items() if ".experts_" in k and k.endswith(".qweight")]
    scales = [t for k, t in state.items() if ".experts_" in k and k.endswith(".scale")]
    assert len(codes) == len(scales) == 3 * moe_layers
    assert all(q.dtype == torch.int8 and q.shape[0] == 8 for q in codes)
    assert all(s.dtype == torch.float32 and s.shape == q.shape[:2] for s, q in zip(scales, codes, strict=True))
    assert any(k.endswith("mlp.router.weight") for k in state)
    layers = report["layers"]
    assert all(layers[n]["scheme"] == "W8A8 rtn per-channel per-token" for n in layers)
    assert all(layer["output_sqnr_db"] > 25 for layer in layers.values())
    inputs = padded_batch([9, 6], 9)
    with torch.no_grad():
        logits_sqnr = sqnr_db(step(*inputs), program(*inputs))
    print(f"{model.spec.family} W8A8 experts: logits SQNR {logits_sqnr:.1f} dB")
    assert logits_sqnr > 25


def test_a_rule_can_quantize_the_router(moe):
    _, _, step, batches = moe
    config = Quantize(scheme=None, rules=(Rule(match="*.mlp.router", scheme=Scheme()),), calibration=CALIBRATION)
    result, report = quantize_program(step, config, batches)
    routers = [n for n in report.get("layers", {}) if n.endswith("mlp.router")]
    state = result.program.exported.state_dict
    # LLaDA2 runs its router in fp32 (the weight is cast before the matmul): no linear reads it directly
    assert len(routers) == sum(k.endswith("mlp.router.qweight") for k in state)
    assert not any(".experts_" in k and k.endswith("qweight") for k in state)


@pytest.mark.parametrize(
    "scheme, message",
    [
        (Scheme(weights="int4", group_size=32, method="gptq"),
         r"^quantize.method: gptq on the experts layers.\d.mlp.experts_gate would need each expert's routed inputs"),
        (Scheme(method="awq"), r"^quantize.method: awq on the experts"),
        (Scheme(activations="per_tensor"), r"^quantize.activations: W8A8 rtn per-channel per-tensor on the experts"),
        (Scheme(activations="per_token", outliers="smoothquant"), r"^quantize.outliers: smoothquant on the experts"),
        (Scheme(weights="int4", group_size=48), r"^quantize.group_size: 48 does not divide the 64 input channels"),
    ],
)
def test_expert_schemes_without_a_quantized_form_are_refused_before_calibrating(moe, scheme, message):
    _, _, step, _ = moe

    def never():
        raise AssertionError("calibration ran")

    config = Quantize(scheme=None, rules=(Rule(match="*.experts_*", scheme=scheme),))
    with pytest.raises(DlmcError, match=message):
        quantize_program(step, config, never)


def test_tiled_experts_are_refused_unless_a_rule_keeps_them_float(moe_checkpoints):
    model = load_model(moe_checkpoints["llada_moe"])
    step = capture(model, CaptureConfig(max_batch=2, moe_experts="tiled"))
    batches = calibration_inputs(Calibration(samples=4, seq_len=16), model.spec, moe_checkpoints["llada_moe"], 256,
                                 model=model)
    with pytest.raises(DlmcError, match=r"^quantize: the experts layers.0.mlp.experts_gate are captured in the tiled"):
        quantize_program(step, Quantize(), batches)
    kept = Quantize(rules=(Rule(match="*.experts_*", scheme=None),), calibration=Calibration(samples=4, seq_len=16))
    result, report = quantize_program(step, kept, batches)
    assert result.modified and report["summary"]["expert_layers"] == 0


@pytest.mark.parametrize(
    "scheme, backend, label",
    [
        ("{weights: int8}", "eager", "W8A16 rtn per-channel"),
        ("{weights: int4, group_size: 32}", "eager", "W4A16 rtn g32"),
        ("{activations: per_token}", "inductor", "W8A8 rtn per-channel per-token"),  # int8 grouped GEMM in AOTI
    ],
    ids=["w8a16", "w4a16", "w8a8-aot-inductor"],
)
def test_compile_and_run_a_quantized_moe_artifact_from_the_cli(moe_checkpoints, tmp_path, scheme, backend, label):
    from typer.testing import CliRunner

    from dlmc.cli import app

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(
        "capture: {dtype: float32, max_batch: 2}\n"
        f"passes:\n  - quantize:\n      scheme: {scheme}\n"
        "      rules: [{match: lm_head, scheme: null}]\n"
        "      calibration: {source: random, samples: 4, seq_len: 16}\n"
        f"lower: {{backend: {backend}}}\n"
    )
    runner = CliRunner()
    out = tmp_path / "out"
    checkpoint = moe_checkpoints["llada_moe"]
    result = runner.invoke(app, ["compile", str(checkpoint), "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "and 9 expert layers" in result.stdout
    report = json.loads((out / "quant_report.json").read_text())
    assert sum(".experts_" in name for name in report[0]["layers"]) == 9
    labels = {layer["scheme"] for name, layer in report[0]["layers"].items() if ".experts_" in name}
    assert labels == {label}
    run = runner.invoke(app, ["run", str(out), "--prompt-ids", "5,6,7", "--gen-length", "8", "--steps", "8", "--json"])
    assert run.exit_code == 0, run.output
    assert len(json.loads(run.stdout.strip().splitlines()[-1])["output_ids"]) == 8
