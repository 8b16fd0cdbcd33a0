import dataclasses
from pathlib import Path

import pytest
import yaml

import dlmc.runtime
from dlmc.capture import CaptureConfig
from dlmc.compiler import compile_model
from dlmc.decoding.block import BlockConfig
from dlmc.decoding.dream import DreamConfig
from dlmc.decoding.llada import LLaDAConfig
from dlmc.decoding.wedlm import WeDLMConfig
from dlmc.errors import DlmcError
from dlmc.lower.eager import EagerSettings
from dlmc.lower.inductor import InductorSettings
from dlmc.lower.onnxrt import OnnxRtSettings
from dlmc.lower.tensorrt import TensorRtSettings
from dlmc.passes.fold_constants import FoldConstants
from dlmc.passes.mixed_precision import MixedPrecision
from dlmc.recipe import Recipe, RecipeError, check_target, default_recipe, dump_recipe, load_recipe, parse_recipe

RECIPE_DIR = Path(__file__).parents[1] / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.exact or "approximate" in recipe.description  # an approximate recipe says so
    assert parse_recipe(dump_recipe(recipe)) == recipe


def test_yaml_maps_to_typed_configs_in_order(tmp_path):
    recipe = load_recipe(
        write(
            tmp_path,
            """
description: mixed
capture: {dtype: float32, max_batch: 4, seq_buckets: [64, 128]}
passes:
  - mixed_precision: {dtype: float16, keep: [lm_head]}
  - fold_constants
lower: {backend: onnxrt, opset: 20, providers: [CPUExecutionProvider]}
decode: {decoder: llada, gen_length: 32, steps: 32, block_length: 16}
""",
        )
    )
    assert recipe.capture == CaptureConfig(dtype="float32", max_batch=4, seq_buckets=(64, 128))
    assert recipe.passes == (MixedPrecision(dtype="float16", keep=("lm_head",)), FoldConstants())
    assert recipe.lower == OnnxRtSettings(opset=20, providers=("CPUExecutionProvider",))
    assert recipe.decode.decoder == "llada" and recipe.decode.config["gen_length"] == 32
    assert not recipe.exact
    assert parse_recipe(dump_recipe(recipe)) == recipe
    assert yaml.safe_load(yaml.safe_dump(dump_recipe(recipe))) == dump_recipe(recipe)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        """
capture: {dtype: int3, max_batch: "8"}
passes:
  - layer_drop: {layers: [1]}
  - fold_constants: {max_bytes: 1.5, colour: red}
  - mixed_precision: {dtype: bfloat16}
lower: {backend: onnxrt, opset: 13}
decode: {decoder: llada, gen_length: 0}
extra: 1
""",
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = info.value.problems
    expected = [
        "extra: unknown section",
        "capture.dtype: 'int3' is not",
        "capture.max_batch: expected an integer",
        "passes[0]: unknown pass 'layer_drop'",
        "passes[1].fold_constants.max_bytes: expected an integer",
        "passes[1].fold_constants.colour: unknown option",
        "lower.opset: the dynamo ONNX exporter needs opset 18",
        "decode.gen_length=0 must be at least 1",
    ]
    assert len(problems) == len(expected)
    for fragment in expected:
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: 8 problems: ")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("lower: {backend: vulkan}", "unknown backend 'vulkan'"),
        ("passes: {fold_constants: {}}", "passes: expected a list"),
        ("passes: [{fold_constants: {}, mixed_precision: {}}]", "expected one pass name"),
        ("decode: {gen_length: 8}", "need a 'decoder'"),
        ("decode: {decoder: beam}", "unknown decoder 'beam'"),
        ("lower: {backend: tensorrt, opt_batch: 64}", "lower.opt_batch: 64 exceeds capture.max_batch 16"),
        ("passes: [{mixed_precision: {dtype: true}}]", "passes[0].mixed_precision.dtype: True is not one of"),
        ("- just\n- a list", "expected a mapping"),
        ("passes: [block_cache, delayed_kv]", "passes: block_cache and delayed_kv each give the step a K/V cache"),
        ("capture: {seq_buckets: [64]}\npasses: [causal_cache]", "causal_cache needs a dynamic sequence length"),
        ("passes: [delayed_kv]\nlower: {backend: tensorrt}", "delayed_kv cannot be lowered to tensorrt"),
        ("passes: [{delayed_kv: {refresh: 0}}]", "passes[0].delayed_kv.refresh: must be >= 1"),
        ("capture: {moe_experts: grouped}\nlower: {backend: onnxrt}",
         "capture.moe_experts: grouped needs a grouped matmul, which onnxrt cannot run"),
        ("capture: {moe_experts: ragged}", "capture.moe_experts: 'ragged' is not one of"),
        (
            "passes: [{block_cache: {mode: dual}}, {layer_skip: {layers: [1]}}]",
            "passes: layer_skip must come before block_cache",
        ),
        (
            "passes: [{block_cache: {block_length: 32}}]\ndecode: {decoder: llada, gen_length: 64, block_length: 16}",
            "decode.block_length: 16 differs from block_cache.block_length 32",
        ),
        ("passes: [block_cache]\ndecode: {decoder: dream}", "block_cache follows the llada decoder's blocks"),
        (
            "passes: [{window_pruning: {window: 64}}]\ndecode: {decoder: llada, gen_length: 64, block_length: 32}",
            "window 64 plus block_length 32 exceeds decode.gen_length 64",
        ),
    ],
)
def test_each_kind_of_mistake_names_its_field(tmp_path, text, fragment):
    with pytest.raises(RecipeError, match=None) as info:
        load_recipe(write(tmp_path, text))
    assert fragment in str(info.value)


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(DlmcError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(DlmcError, match="not valid YAML at line"):
        load_recipe(write(tmp_path, "capture: {max_batch: 1\npasses: ]\n"))


def test_empty_recipe_means_all_defaults(tmp_path):
    assert load_recipe(write(tmp_path, "")) == Recipe()


def test_default_recipe_is_exact_inductor():
    recipe = default_recipe("cpu")
    assert recipe.exact and isinstance(recipe.lower, InductorSettings)
    assert [p.name for p in recipe.passes] == ["fold_constants"]
    for device in ("mps", "gpu0"):
        with pytest.raises(DlmcError, match=f"device: '{device}' is not supported"):
            default_recipe(device)
    assert check_target(recipe, "tpu") == ["device: 'tpu' is not supported (use cpu, cuda or cuda:N)"]


def test_target_checks_name_what_the_machine_lacks(monkeypatch):
    trt = Recipe(lower=TensorRtSettings())
    problems = check_target(trt, "cpu")
    assert any("runs only on a CUDA device" in p for p in problems)
    onnx_bf16 = Recipe(passes=(MixedPrecision(dtype="bfloat16"),), lower=OnnxRtSettings())
    assert any("no bfloat16 MatMul" in p for p in check_target(onnx_bf16, "cpu"))
    assert check_target(Recipe(lower=OnnxRtSettings()), "cpu") == []
    assert any("no bfloat16" in p for p in check_target(Recipe(lower=OnnxRtSettings()), "cpu", "bfloat16"))
    wrong_provider = Recipe(lower=OnnxRtSettings(providers=("NoSuchExecutionProvider",)))
    assert any("NoSuchExecutionProvider is not available" in p for p in check_target(wrong_provider, "cpu"))

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    (problem,) = check_target(Recipe(lower=OnnxRtSettings()), "cpu")
    assert "onnxscript" in problem and "pip install 'dlmc[onnx]'" in problem


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("name", ["cpu-bf16.yaml", "cpu-bf16-dual.yaml"])
def test_generic_bf16_recipes_fit_any_llada_or_dream_checkpoint(checkpoints, tmp_path, name, family):
    recipe = load_recipe(RECIPE_DIR / name)
    assert recipe.capture.dtype == "bfloat16" and isinstance(recipe.lower, InductorSettings)
    assert recipe.decode.decoder is None  # nothing tied to one model
    assert recipe.passes[-1].name == "fuse_decode"
    # AOTInductor takes ~10 s per compile here; the same capture and passes lowered eagerly take ~1 s.
    engine = dlmc.runtime.load(compile_model(checkpoints[family], dataclasses.replace(recipe, lower=EagerSettings()),
                                             tmp_path / "out"))
    prompts = [[5, 6, 7, 8, 9, 10]]
    # cpu-bf16 fuses the family's own sampler (fuse_decode {decoder: auto}); the dual cache needs llada's
    assert engine.signature.fused_decoder == (family if name == "cpu-bf16.yaml" else "llada")
    if engine.signature.fused_decoder == "dream":
        assert engine.generate(prompts, "dream", DreamConfig(max_new_tokens=32, steps=8)).nfe == 8
        with pytest.raises(DlmcError, match="fuses the dream decoder's rule, not llada's"):
            engine.generate(prompts, "llada")
        return
    # The dual cache runs under the llada decoder at its block length, which handles Dream's shifted logits too.
    result = engine.generate(prompts, "llada", LLaDAConfig(gen_length=32, steps=8, block_length=32))
    assert len(result.output_ids[0]) == 32 and result.nfe == 8
    with pytest.raises(DlmcError, match="fuses the llada decoder's rule, not dream's"):
        engine.generate(prompts, "dream")  # a family's own sampler is refused, not run
    if engine.signature.cache is not None:  # the block length is a run-time setting of the fused loop
        assert engine.generate(prompts, "llada", LLaDAConfig(gen_length=16, block_length=8, steps=4)).nfe == 4


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar", "wedlm"])
def test_generic_causal_bf16_recipe_fits_any_block_causal_or_causal_checkpoint(checkpoints, tmp_path, family):
    recipe = load_recipe(RECIPE_DIR / "cpu-bf16-causal.yaml")
    assert recipe.capture.dtype == "bfloat16" and isinstance(recipe.lower, InductorSettings)
    assert recipe.decode.decoder is None and recipe.exact  # nothing tied to one model; exact
    assert [p.name for p in recipe.passes[-3:]] == ["causal_cache", "cpu_attention", "fuse_decode"]
    # lowered eagerly here for time (AOTInductor: tests/runtime/test_block_loop.py, test_wedlm_loop.py, the CLI)
    engine = dlmc.runtime.load(compile_model(checkpoints[family], dataclasses.replace(recipe, lower=EagerSettings()),
                                             tmp_path / "out"))
    decoder, config = ("wedlm", WeDLMConfig(max_new_tokens=16)) if family == "wedlm" else ("block", BlockConfig(
        gen_length=16))
    assert engine.manifest["decode"]["decoder"] == decoder  # auto: the model's own sampler
    assert engine.signature.cache["policy"] == "exact"
    result = engine.generate([[5, 6, 7, 8, 9, 10]], config=config)  # the manifest's decoder
    assert len(result.output_ids[0]) == 16
    with pytest.raises(DlmcError, match=f"fuses the {decoder} decoder's rule, not llada's"):
        engine.generate([[5, 6]], "llada")


def test_decode_strategy_needs_the_fused_outputs_it_reads():
    def recipe(outputs, strategy, cache=False):
        passes = [{"block_cache": {"mode": "dual", "block_length": 8}}] if cache else []
        passes += [{"fuse_decode": {"outputs": outputs}}]
        decode = {"decoder": "llada", "gen_length": 16, "block_length": 8, "strategy": strategy}
        return parse_recipe({"passes": passes, "lower": {"backend": "eager"}, "decode": decode})

    kept = recipe(["entropy"], {"name": "eb", "gamma": 0.3})
    assert kept.decode.config["strategy"] == {"name": "eb", "gamma": 0.3}  # the name survives into a manifest
    with pytest.raises(DlmcError, match=r"decode.strategy: eb reads entropy; add it to fuse_decode.outputs"):
        recipe([], "eb")
    with pytest.raises(DlmcError, match=r"decode.strategy: prophet reads every generated position"):
        recipe(["margin"], "prophet", cache=True)
    with pytest.raises(DlmcError, match=r"unknown strategy 'nope'"):
        recipe([], "nope")
