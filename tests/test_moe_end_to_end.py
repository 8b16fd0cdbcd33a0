"""The mixture-of-experts families end to end: `dlmc inspect` and `dlmc run` on each fixture, `dlmc compile`
with the default recipe (AOTInductor), causal_cache on the block-causal ones and ONNX Runtime, each
artifact giving the reference decoder's tokens (decisions clear of rounding, see MarginRecorder)."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

import dlmc.runtime
from dlmc.cli import app
from dlmc.compiler import compile_model
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from dlmc.testing.fixtures import MOE_FAMILIES
from tests.test_compiler import PROMPTS, reference_tokens

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_inspect_and_run(moe_checkpoints, family):
    shown = invoke("inspect", moe_checkpoints[family])
    assert shown.exit_code == 0, shown.output
    assert family in shown.output and "parameters" in shown.output
    args = ["--prompt", "hi", "--prompt-ids", "5,6,7", "--gen-length", 8, "--json"]
    result = invoke("run", moe_checkpoints[family], *args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [len(row["output_ids"]) for row in rows] == [8, 8]


def test_compile_default_recipe_from_the_cli(moe_checkpoints, tmp_path):
    out = tmp_path / "art"
    compiled = invoke("compile", moe_checkpoints["llada_moe"], "-o", out)
    assert compiled.exit_code == 0, compiled.output
    engine = dlmc.runtime.load(out)
    assert engine.manifest["backend"]["name"] == "inductor" and engine.manifest["exact"]
    model = load_model(moe_checkpoints["llada_moe"])
    for label, prompts in PROMPTS.items():
        config, expected = reference_tokens(model, prompts)
        assert engine.generate(prompts, config=config).output_ids == expected, label
    ran = invoke("run", out, "--prompt-ids", "5,6,7", "--gen-length", 8, "--json")
    assert ran.exit_code == 0 and len(json.loads(ran.stdout)["output_ids"]) == 8


ONNX = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")


@pytest.mark.parametrize(
    "family, cache, backend",
    [
        ("llada2", True, "inductor"),
        ("sdar_moe", True, "eager"),
        pytest.param("llada2", False, "onnxrt", marks=ONNX),
    ],
)
def test_compiled_step_gives_reference_tokens(moe_checkpoints, tmp_path, family, cache, backend):
    passes = [{"fold_constants": {}}] + ([{"causal_cache": {}}] if cache else [])
    capture = {"dtype": "float32"} if backend == "onnxrt" else {}
    recipe = parse_recipe({"capture": capture, "passes": passes, "lower": {"backend": backend}}, "test")
    model = load_model(moe_checkpoints[family])
    expected = {label: reference_tokens(model, prompts, gen_length=40) for label, prompts in PROMPTS.items()}
    engine = dlmc.runtime.load(compile_model(moe_checkpoints[family], recipe, tmp_path / "out"))
    assert engine.manifest["exact"] and (engine.signature.cache is not None) == cache
    for label, prompts in PROMPTS.items():
        config, tokens = expected[label]
        assert engine.generate(prompts, config=config).output_ids == tokens, label


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_shipped_moe_recipe_fits_every_moe_family(moe_checkpoints, tmp_path, family):
    import dataclasses

    import torch

    from dlmc.lower.eager import EagerSettings
    from dlmc.recipe import load_recipe
    from tests.test_recipe import RECIPE_DIR

    recipe = load_recipe(RECIPE_DIR / "cpu-moe-bf16.yaml")
    assert recipe.capture.moe_experts == "grouped" and recipe.exact
    # lowered eagerly here for time (AOTInductor: test_compile_default_recipe_from_the_cli, grouped too)
    eager = dataclasses.replace(recipe, lower=EagerSettings())
    engine = dlmc.runtime.load(compile_model(moe_checkpoints[family], eager, tmp_path / "out"))
    model = load_model(moe_checkpoints[family], dtype=torch.bfloat16)
    ids = torch.tensor([[5, 77, 9, 130, 200, 3, 42, 18, 99]])
    inputs = (ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(ids.shape[1])[None])
    with torch.no_grad():  # the same ops on the same bf16 weights: the graph is the model
        assert torch.equal(engine.run_step(*inputs)[0], model(*inputs))
