import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dlmc.capture import CaptureConfig, capture
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.passes import copy_graph, input_kinds, rebuild
from dlmc.passes.quantize import Quantize, quantize, quantize_program
from dlmc.pipeline import check_program
from dlmc.quant import ops
from dlmc.quant.calibration import calibration_inputs, quant_session
from dlmc.quant.formats import sqnr_db
from dlmc.quant.hadamard import hadamard
from dlmc.quant.scheme import Calibration, Rule, Scheme
from tests.helpers import padded_batch

W4_GPTQ = Scheme(weights="int4", group_size=32, method="gptq")
W4_AWQ = Scheme(weights="int4", group_size=32, method="awq", symmetric=False)
W8_ASYM = Scheme(weights="int8", group_size=32, symmetric=False)
MIXED_WEIGHT_ONLY = Quantize(
    scheme=Scheme(),
    rules=(Rule(match="lm_head", scheme=None), Rule(match="*.q_proj", scheme=W4_GPTQ),
           Rule(match="*.k_proj", scheme=W4_AWQ), Rule(match="*.o_proj", scheme=W8_ASYM)),
    calibration=Calibration(samples=8, seq_len=24),
)
W8A8_SCHEMES = Quantize(
    scheme=Scheme(activations="per_token", outliers="hadamard"),
    rules=(Rule(match="lm_head", scheme=None),
           Rule(match="*.attn.*", scheme=Scheme(activations="per_tensor", outliers="smoothquant", method="gptq")),
           Rule(match="*.gate_proj", scheme=Scheme(activations="per_tensor"))),
    calibration=Calibration(samples=8, seq_len=24),
)


@pytest.fixture(scope="module")
def llada(checkpoints):
    model = load_model(checkpoints["llada"])  # hidden 64, intermediate 96, 2 layers
    return checkpoints["llada"], model, capture(model, CaptureConfig(max_batch=8))


@pytest.fixture(scope="module")
def weight_only(llada):
    path, _, step = llada
    with quant_session(path) as session:  # how the compiler runs it: calibration from the checkpoint's tokenizer
        result = quantize(step, MIXED_WEIGHT_ONLY)
    return result, session.reports


@pytest.fixture(scope="module")
def w8a8(llada):
    path, model, step = llada
    batches = calibration_inputs(W8A8_SCHEMES.calibration, model.spec, path, 256, model=model)
    return quantize_program(step, W8A8_SCHEMES, batches)


def _buffers(program, layer):
    state = program.exported.state_dict
    return {k.removeprefix(layer + "."): v for k, v in state.items() if k.startswith(layer + ".")}


def test_weight_only_structure(weight_only, llada):
    (result, reports), (_, model, step) = weight_only, llada
    assert result.modified
    program = result.program
    check_program(program)
    nodes = list(program.graph_module.graph.nodes)
    assert sum(n.target is ops.linear_woq for n in nodes) == 7 * 2
    assert sum(n.target is torch.ops.aten.linear.default for n in nodes) == 1  # the output head stays
    state = program.exported.state_dict
    assert "lm_head.weight" in state and "layers.0.attn.q_proj.weight" not in state
    q = _buffers(program, "layers.0.attn.q_proj")
    assert q["qweight"].dtype == torch.uint8 and q["qweight"].shape == (64, 2, 16)  # int4, two per byte
    assert "zero" not in q and "inv_scale" not in q
    k = _buffers(program, "layers.1.attn.k_proj")
    assert set(k) == {"qweight", "scale", "zero", "inv_scale"}  # asymmetric AWQ
    assert _buffers(program, "layers.0.mlp.down_proj")["qweight"].dtype == torch.int8
    before = sum(t.numel() * t.element_size() for t in step.exported.state_dict.values())
    after = sum(t.numel() * t.element_size() for t in state.values())
    assert after < 0.6 * before
    ((report,),) = [reports]
    assert report["summary"]["layers"] == 14 and report["calibration"]["source"] == "self"  # not the embedded
    layers = report["layers"]
    assert layers["layers.0.attn.q_proj"]["scheme"] == "W4A16 gptq g32"
    assert "awq_alpha" in layers["layers.0.attn.k_proj"]
    for name, layer in layers.items():
        assert layer["output_sqnr_db"] > (12 if "int4" in name or layer["scheme"].startswith("W4") else 30), name
        assert layer["inputs"]["absmax"] > 0


def test_weight_only_matches_eager_oracle(weight_only, llada):
    """Oracle: the eager model with each quantized weight replaced by its dequantized value (divided
    column-wise by the AWQ scale, which the graph applies to the input instead)."""
    (result, _), (_, model, _) = weight_only, llada
    program = result.program
    oracle = copy.deepcopy(model)
    params = dict(oracle.named_parameters())
    for layer_name in {k.rpartition(".")[0] for k in program.exported.state_dict if k.endswith(".qweight")}:
        b = _buffers(program, layer_name)
        nbits = 4 if b["qweight"].dim() == 3 else 8
        w = ops.dequantize_weight(b["qweight"], b["scale"], b.get("zero"), nbits)
        if "inv_scale" in b:
            w = w * b["inv_scale"]
        with torch.no_grad():
            params[layer_name + ".weight"].copy_(w)
    inputs = padded_batch([9, 6], 9)
    with torch.no_grad():
        torch.testing.assert_close(program(*inputs), oracle(*inputs), rtol=1e-4, atol=1e-4)


class W8A8Oracle(TorchFunctionMode):
    """F.linear on the listed weights (by identity) computed as int8 x int8 -> int32 in int64 here,
    written independently of dlmc.quant.ops."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers  # id(weight) -> buffers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and id(args[1]) in self.layers:
            b = self.layers[id(args[1])]
            x = args[0]
            if "inv_scale" in b:
                x = x * b["inv_scale"]
            if "rotation" in b:
                x = x @ b["rotation"]
            s = b["act_scale"] if "act_scale" in b else x.abs().amax(-1, keepdim=True) / 127
            xq = torch.round(x / s).clamp(-128, 127).long()
            acc = (xq @ b["qweight"].long().T).double()
            return (acc * s.double() * b["scale"].double().reshape(-1)).float()
        return func(*args, **kwargs)


def test_w8a8_matches_eager_oracle(w8a8, llada):
    (result, report), (_, model, step) = w8a8, llada
    program = result.program
    check_program(program)
    nodes = list(program.graph_module.graph.nodes)
    assert sum(n.target is ops.linear_w8a8 for n in nodes) == 14
    state = program.exported.state_dict
    # Hadamard factors shared by the layers (64 input channels = 8 x 8, 96 = 3 blocks of 4 x 8), never a
    # dense [in, in] rotation
    assert sorted(k for k in state if k.startswith("quant.hadamard")) == ["quant.hadamard_4_float32",
                                                                          "quant.hadamard_8_float32"]
    assert state["layers.0.attn.q_proj.act_scale"].dim() == 0
    assert "act_scale" not in _buffers(program, "layers.0.mlp.down_proj")  # per token: dynamic
    params = dict(model.named_parameters())
    layers = {}
    for name in {k.rpartition(".")[0] for k in state if k.endswith(".qweight")}:
        b = _buffers(program, name)
        if name.endswith(("up_proj", "down_proj")):  # the dense rotation, built independently of the graph's
            b["rotation"] = hadamard(params[name + ".weight"].shape[1])
        layers[id(params[name + ".weight"])] = b
    inputs = padded_batch([9, 6], 9)
    with torch.no_grad(), W8A8Oracle(layers):
        expected = model(*inputs)
    actual = program(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        float_logits = step(*inputs)
    assert sqnr_db(float_logits, actual) > 15  # random weights: near-flat logits, so no argmax check
    assert report["layers"]["layers.1.mlp.down_proj"]["rotation"] == "hadamard 96"
    assert "smooth_scale" in report["layers"]["layers.0.attn.v_proj"]


def _sequential(config: Quantize) -> Quantize:
    return Quantize(scheme=config.scheme, rules=config.rules,
                    calibration=Calibration(samples=8, seq_len=24, sequential=True))


def test_sequential_rtn_equals_all_at_once(llada):
    """Round to nearest does not look at activations: calibrating layer by layer changes nothing."""
    path, model, step = llada
    config = Quantize(scheme=Scheme(weights="int4", group_size=32), rules=(Rule(match="lm_head", scheme=None),),
                      calibration=Calibration(samples=8, seq_len=24))
    batches = calibration_inputs(config.calibration, model.spec, path, 256, model=model)
    together = quantize_program(step, config, batches)[0].program
    sequential = quantize_program(step, _sequential(config), batches)[0].program
    for key, value in together.exported.state_dict.items():
        torch.testing.assert_close(sequential.exported.state_dict[key], value, rtol=0, atol=0)


def test_sequential_gptq_calibrates_each_layer_on_the_quantized_layers_before_it(llada):
    """A layer's GPTQ Hessian comes from the outputs of the layers already quantized: quantizing
    layers.0 first and then layers.1.attn.q_proj on the result gives the same codes as one sequential run."""
    path, model, step = llada
    gptq = Scheme(weights="int4", group_size=32, method="gptq")
    calibration = Calibration(samples=8, seq_len=24, sequential=True)
    batches = calibration_inputs(calibration, model.spec, path, 256, model=model)
    first = Quantize(scheme=None, rules=(Rule(match="layers.0.*", scheme=gptq),), calibration=calibration)
    then = Quantize(scheme=None, rules=(Rule(match="layers.1.attn.q_proj", scheme=gptq),), calibration=calibration)
    both = Quantize(scheme=None, rules=(*first.rules, *then.rules), calibration=calibration)
    in_two_runs = quantize_program(quantize_program(step, first, batches)[0].program, then, batches)[0].program
    in_one_run = quantize_program(step, both, batches)[0].program
    for key, value in in_two_runs.exported.state_dict.items():
        torch.testing.assert_close(in_one_run.exported.state_dict[key], value, rtol=0, atol=0)
    float_inputs = quantize_program(step, Quantize(scheme=None, rules=then.rules, calibration=calibration), batches)
    key = "layers.1.attn.q_proj.qweight"
    assert not torch.equal(float_inputs[0].program.exported.state_dict[key], in_one_run.exported.state_dict[key])


def test_nothing_to_quantize_is_unmodified_and_second_run_is_a_no_op(weight_only, llada):
    (result, _), (path, _, step) = weight_only, llada
    none = Quantize(scheme=None, calibration=Calibration(source="random", samples=4))
    assert not quantize_program(step, none, [])[0].modified
    again, report = quantize_program(result.program, MIXED_WEIGHT_ONLY, [])
    assert not again.modified and report == {}


def test_group_size_that_does_not_divide_fails_before_calibrating(llada):
    _, _, step = llada
    config = Quantize(scheme=Scheme(weights="int4", group_size=64))

    def never():
        raise AssertionError("calibration ran")

    message = r"^quantize.group_size: 64 does not divide the 96 input channels of layers.0.mlp.down_proj$"
    with pytest.raises(DlmcError, match=message):
        quantize_program(step, config, never)


def test_non_finite_activations_are_one_clear_line(llada):
    path, model, step = llada
    kinds = input_kinds(step)
    state = dict(step.exported.state_dict)
    embed = next(key for kind, key in kinds.values() if kind == "PARAMETER" and "embed" in key)
    state[embed] = torch.nn.Parameter(torch.full_like(state[embed], float("nan")), requires_grad=False)
    broken = rebuild(step, copy_graph(step), state_dict=state)
    batches = calibration_inputs(Calibration(samples=4), model.spec, path, 256, model=model)
    message = r"^quantize.calibration: non-finite activations \(NaN/inf\) at the input of layers.0.attn.q_proj"
    with pytest.raises(DlmcError, match=message):
        quantize_program(broken, Quantize(), batches)


def test_calibration_batches_larger_than_the_step_run_in_chunks(llada):
    """A step captured for batch 1 holds the batch as a constant; batch_size 8 used to stop with
    torch's "expanded size" error. The static activation scales are maxima: any grouping gives them."""
    path, model, _ = llada
    single = capture(model, CaptureConfig(max_batch=1))
    scheme = Scheme(activations="per_tensor")
    scales = []
    for batch_size in (8, 1):
        config = Quantize(scheme=scheme, calibration=Calibration(samples=8, seq_len=24, batch_size=batch_size))
        with quant_session(path):
            program = quantize(single, config).program
        scales.append({k: v for k, v in program.exported.state_dict.items() if k.endswith("act_scale")})
    assert scales[0].keys() == scales[1].keys() and len(scales[0]) == 15
    assert all(torch.equal(scales[0][k], scales[1][k]) for k in scales[0])


def test_the_fp16_jetson_recipe_calibrates_a_llada_checkpoint(tmp_path):
    """The Jetson W8A8 recipe's passes on a fp16 LLaDA: static int8 activations put |int32 sums| above
    65504 already at 64 input channels; the layer's rescale must not pass through fp16 (it did, and
    calibration stopped at "non-finite activations at layers.0.attn.o_proj", fed by q/k/v's inf)."""
    import yaml

    from dlmc.compiler import compile_model
    from dlmc.recipe import check_target, parse_recipe
    from dlmc.runtime import load
    from dlmc.testing.fixtures import write_checkpoint

    recipe_path = Path(__file__).parents[2] / "recipes" / "llada-8b-jetson-orin-w8a8.yaml"
    data = yaml.safe_load(recipe_path.read_text())
    prompts = tmp_path / "calibration.txt"
    prompts.write_text("\n".join(f"count {37 * i}: and then some words" for i in range(8)))
    data["passes"][1]["quantize"]["calibration"].update(file=str(prompts), samples=8, seq_len=48)
    recipe = parse_recipe(data)
    if check_target(recipe, "cpu", "float16"):  # no onnxruntime here: the passes are what matter
        recipe = parse_recipe(data | {"lower": {"backend": "eager"}})
    checkpoint = write_checkpoint("llada", tmp_path / "m", dtype=torch.float16)
    out = compile_model(checkpoint, recipe, tmp_path / "out")
    engine = load(out)
    logits = engine(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


@pytest.mark.slow  # quantized steps on AOTInductor run from the CLI in tests/passes/test_quantize_experts.py
def test_lowers_with_inductor(w8a8, weight_only):
    from dlmc.lower.inductor import InductorSettings, lower

    inputs = padded_batch([9, 6], 9)
    for program in (weight_only[0].program, w8a8[0].program):
        expected = program(*inputs)
        actual = lower(program, InductorSettings(), "cpu")(*inputs)
        assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95
        assert ((actual - expected).abs() / (1 + expected.abs())).max() < 0.25


def test_compile_and_run_a_quantized_artifact_from_the_cli(checkpoints, tmp_path):
    import json

    from typer.testing import CliRunner

    from dlmc.cli import app

    recipe = tmp_path / "w4.yaml"
    recipe.write_text(
        "capture: {dtype: float32, max_batch: 4}\n"
        "passes:\n  - fold_constants: {}\n  - quantize:\n"
        "      scheme: {weights: int4, group_size: 32, method: gptq}\n"
        "      rules: [{match: lm_head, scheme: null}]\n"
        "      calibration: {source: self, samples: 8, seq_len: 24}\n"
        "lower: {backend: eager}\n"
    )
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["compile", str(checkpoints["llada"]), "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "quantized 14 linear layers (W4A16 gptq g32) on 8 self samples x 24 tokens" in result.stdout
    assert "layer output SQNR: median" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert "quant_report.json" in manifest["files"] and manifest["exact"] is False
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report[0]["layers"]) == 14
    run = runner.invoke(app, ["run", str(out), "--prompt-ids", "5,6,7", "--gen-length", "8", "--steps", "8", "--json"])
    assert run.exit_code == 0, run.output
    assert len(json.loads(run.stdout.strip().splitlines()[-1])["output_ids"]) == 8


def test_cli_refuses_a_scheme_the_backend_cannot_run_and_writes_nothing(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from dlmc.cli import app

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "passes:\n  - quantize: {scheme: {weights: int4, group_size: 32, symmetric: false}}\n"
        "lower: {backend: onnxrt, opset: 21}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compile", str(checkpoints["llada"]), "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "asymmetric int4 has no ONNX lowering" in result.stderr
    assert not out.exists()


def test_outlier_handling_on_the_embedded_models_down_projections():
    """The embedded model has the dLLM pattern: massive activations at the FFN down-projection input
    (absmax ~60x the median channel). Naive per-tensor int8 loses most there; SmoothQuant and the
    Hadamard rotation recover it. Measured as the layer-output SQNR of the calibration report."""
    from dlmc.generation import default_model_dir

    model = load_model(default_model_dir())
    step = capture(model, CaptureConfig(max_batch=8))
    batches = calibration_inputs(Calibration(samples=16, seq_len=48), model.spec, default_model_dir(), 256)
    sqnr = {}
    for name, scheme in {
        "naive": Scheme(activations="per_tensor"),
        "smoothquant": Scheme(activations="per_tensor", outliers="smoothquant"),
        "hadamard": Scheme(activations="per_token", outliers="hadamard"),
        "w8a16": Scheme(),
    }.items():
        config = Quantize(scheme=None, rules=(Rule(match="*.down_proj", scheme=scheme),))
        report = quantize_program(step, config, batches)[1]
        sqnr[name] = [layer["output_sqnr_db"] for layer in report["layers"].values()]
        inputs = [layer["inputs"] for layer in report["layers"].values()]
    assert max(i["max_over_median"] for i in inputs) > 20  # the outliers are real, not injected
    worst = {name: min(values) for name, values in sqnr.items()}
    assert worst["smoothquant"] > worst["naive"] + 6
    assert worst["hadamard"] > worst["naive"] + 6
    assert worst["w8a16"] > 40 and worst["hadamard"] > 35
