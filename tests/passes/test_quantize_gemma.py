"""The quantize pass on DiffusionGemma's two programs: W4A16 RTN on the dense linears and the experts (stored
[E, out, in], read as transposed views), routers and the tied head float, the same quantized weights in the
encoder and the decoder; the decoder iteration is the eager model with RTN applied to its weights (the
oracle, written from dlmc.quant.formats), whose logits stay within a measured SQNR of the float model's;
`dlmc run` on the compiled artifact; the refusals; and the RTX recipe validated and compiled on CPU at the
fixture's sizes."""

import copy
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import dlmc.runtime

from dlmc.capture import CaptureConfig
from dlmc.capture_gemma import DecoderStep, capture_gemma
from dlmc.cli import app
from dlmc.compiler import compile_model
from dlmc.decoding.diffusion_gemma import DiffusionGemmaConfig
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.passes.quantize import Quantize
from dlmc.passes.quantize_gemma import calibration_batches, gemma_config, quantize_gemma
from dlmc.quant import ops
from dlmc.quant.formats import rtn, sqnr_db
from dlmc.quant.scheme import Calibration, Scheme
from dlmc.recipe import load_recipe
from dlmc.testing.gemma_fixtures import write_gemma_checkpoint
from tests.helpers import rounding_tolerance

GROUP = 16  # divides every input width of the fixture (hidden 32, experts 16, MLP 48)
W4 = Quantize(scheme=Scheme(weights="int4", group_size=GROUP), calibration=Calibration(samples=4, seq_len=8))
LOGITS_SQNR_DB = 3.0
"""W4A16 g16 on the fixture's decoder logits against the float model's: measured 3.9 dB (each layer's output
about 21 dB, quant_report.json; random 32-wide weights over 3 layers, and the perturbed residual moves some
routers' top-k choices). A wrong expert layout (rows of the transposed view) lands far below 0 dB; the
oracle comparison above it is the exact check."""
RTX_RECIPE = "recipes/gemma-26b-rtx4090-w4a16.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_gemma_checkpoint(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def quantized(checkpoint):
    model = load_model(checkpoint)
    programs, _ = capture_gemma(model, CaptureConfig(max_batch=2))
    config = gemma_config(W4)
    batches = calibration_batches(programs, model, config.calibration)
    result = {name: quantize_gemma(program, name, config, batches[name]) for name, program in programs.items()}
    return model, programs, result, batches


def _oracle(model):
    """The eager model with RTN (W4, groups of 16) applied to each dense linear and to each expert's
    [out, in] matrix on its own; routers and the embedding / tied head untouched."""
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in oracle.named_parameters():
            if "router" in name or "embed_tokens" in name or param.ndim < 2:
                continue
            matrices = param if param.ndim == 3 else param[None]  # [E, out, in] or [1, out, in]
            for w in matrices:
                w.copy_(rtn(w, 4, True, GROUP).dequantize())
    return oracle


def test_both_programs_hold_the_same_quantized_weights_and_keep_router_and_head_float(quantized):
    model, _, programs, _ = quantized
    states = {name: program.exported.state_dict for name, program in programs.items()}
    for name, program in programs.items():
        targets = [n.target for n in program.graph_module.graph.nodes]
        assert targets.count(ops.grouped_woq) == 2 * model.arch.num_layers, name
        assert torch.ops.dlmc.grouped_mm.default not in targets, name
        state = states[name]
        assert not any(k.startswith("model.layers.") and k.endswith(("experts.gate_up_proj", "experts.down_proj",
                                                                       "mlp.up_proj.weight")) for k in state)
        assert all(k in state for k in ("model.layers.0.router.proj.weight", "model.embed_tokens.weight"))
    shared = [k for k in states["encoder"] if k.endswith(".qweight") or k.endswith("proj.scale")]
    assert len(shared) == 2 * (9 + 9 + 8)  # qweight, scale: attention 4 + MLP 3 + experts 2 (layer 2: no v_proj)
    assert all(torch.equal(states["encoder"][k], states["decoder"][k]) for k in shared)
    assert any(k.startswith("model.self_conditioning") for k in states["decoder"] if k.endswith(".qweight"))


def test_the_decoder_is_the_rtn_oracle_and_its_logits_stay_near_float(quantized):
    model, floats, programs, batches = quantized
    inputs = batches["decoder"][0]
    oracle = _oracle(model)
    with torch.no_grad():
        canvas, argmax, entropy, soft = programs["decoder"](*inputs)
        expected = DecoderStep(oracle)(*inputs)
        cache = calibration_cache(inputs, model.arch.num_layers)
        approx = oracle.denoise(inputs[0], inputs[1], cache, soft=inputs[-5]).float()  # [B, C, V]
        exact = model.denoise(inputs[0], inputs[1], cache, soft=inputs[-5]).float()
    tol = rounding_tolerance(torch.float32, model.arch.hidden_size * 8, float(expected[3].abs().max()))
    torch.testing.assert_close(soft, expected[3], atol=tol, rtol=0)
    torch.testing.assert_close(entropy, expected[2], atol=1e-4, rtol=0)
    assert (argmax == expected[1]).float().mean() > 0.95  # a flip only where the oracle's top-2 nearly tie
    assert sqnr_db(exact, approx) > LOGITS_SQNR_DB


def calibration_cache(inputs, n):
    from dlmc.models.diffusion_gemma import GemmaCache

    cache = inputs[2 : 4 + 2 * n]
    return GemmaCache(list(cache[2 : 2 + n]), list(cache[2 + n :]), cache[0], cache[1])


@pytest.mark.parametrize("config, fragment", [
    (Quantize(scheme=Scheme(weights="int4", group_size=GROUP, method="awq")), "only weight-only rtn"),
    (Quantize(scheme=Scheme(activations="per_token")), "only weight-only rtn"),
    (Quantize(scheme=Scheme(), calibration=Calibration(source="tasks")), "no mask token"),
])
def test_schemes_that_would_differ_between_the_programs_are_refused(config, fragment):
    with pytest.raises(DlmcError, match=fragment):
        gemma_config(config)


def test_a_w4a16_artifact_runs_and_reports_both_programs(checkpoint, tmp_path):
    recipe = tmp_path / "w4.yaml"
    recipe.write_text(f"passes:\n  - quantize:\n      scheme: {{weights: int4, group_size: {GROUP}}}\n"
                      "      calibration: {samples: 4, seq_len: 8}\nlower: {backend: eager}\n")
    artifact = compile_model(checkpoint, recipe, tmp_path / "art")
    reports = json.loads((artifact / "quant_report.json").read_text())
    assert [r["program"] for r in reports] == ["encoder", "decoder"]
    assert all(r["summary"]["expert_layers"] == 6 for r in reports)  # 3 layers: gate_up and down
    result = CliRunner().invoke(app, ["run", str(artifact), "--prompt-ids", "2,10,11,12", "--gen-length", "8",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout.splitlines()[-1])["output_ids"]) == 8


@pytest.mark.slow  # ~2 min: two bf16 programs through AOTInductor
def test_the_rtx_recipe_validates_and_its_passes_compile_on_cpu(checkpoint, tmp_path):
    validated = CliRunner().invoke(app, ["validate", RTX_RECIPE])
    assert validated.exit_code == 0 and "ok" in validated.stdout, validated.output
    recipe = yaml.safe_load(open(RTX_RECIPE))
    assert recipe["passes"][0]["quantize"]["scheme"] == {"weights": "int4", "group_size": 64}
    recipe["passes"][0]["quantize"]["scheme"]["group_size"] = GROUP  # the fixture's widths: 64 divides none
    recipe["passes"][0]["quantize"]["calibration"] = {"samples": 4, "seq_len": 8}
    path = tmp_path / "rtx-fixture.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(path).lower.backend == "inductor"
    artifact = compile_model(checkpoint, path, tmp_path / "rtx")  # bf16, AOTInductor, on CPU
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["backend"]["settings"]["backend"] == "inductor"
    reports = json.loads((artifact / "quant_report.json").read_text())
    assert {r["summary"]["schemes"][0] for r in reports} == {f"W4A16 rtn g{GROUP}"}
    # the programs' quantized codes are the same: one copy of them, on disk and (user-managed) in memory
    assert [name for name in manifest["files"] if name.endswith(".safetensors")] == ["weights.safetensors"]
    assert "keys" not in manifest["programs"]["encoder"]["backend"]
    config = DiffusionGemmaConfig(max_new_tokens=8, max_denoising_steps=2)
    assert len(dlmc.runtime.load(artifact).generate([[2, 10, 11, 12]], config=config).output_ids[0]) == 8
