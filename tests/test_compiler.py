"""compile_model end to end: every family on every backend this machine has reproduces the reference
decoder's tokens, and every kind of bad input is one line with nothing written."""

import importlib.util
from pathlib import Path

import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding import DECODERS, default_decoder
from dlmc.errors import DlmcError
from dlmc.lower.eager import EagerSettings
from dlmc.models import load_model
from dlmc.passes.mixed_precision import MixedPrecision
from dlmc.recipe import Recipe, RecipeError, load_recipe
from dlmc.testing.fixtures import FAMILIES
from tests.helpers import MarginRecorder
from tests.passes.test_mixed_precision import LowPrecisionMatmuls

RECIPES = Path(__file__).parents[1] / "recipes"
BACKEND_RECIPES = {
    "eager": RECIPES / "cpu-eager.yaml",
    "inductor": None,  # the default recipe
    "onnxrt": RECIPES / "cpu-onnxrt.yaml",
}
SHORT = {  # a few denoising steps each, so 30 generations stay fast
    "llada": dict(gen_length=12, steps=6, block_length=4),
    "dream": dict(max_new_tokens=12, steps=6),
    "block": dict(gen_length=12),
    "wedlm": dict(max_new_tokens=12),
    "llada2": dict(gen_length=12),
}
PROMPTS = {
    "batch 1": [[5, 6, 7, 8, 9, 10]],
    "batch 2, left-padded": [[5, 6, 7, 8, 9, 10], [40, 41, 42]],
}


def reference_tokens(model, prompts, margins=True, **overrides):
    """The reference decoder's config and tokens. With `margins` (fp32 models), the arg-max of every
    logits row that predicts a mask clears the rounding tolerance, so paths that compute the same maths
    with other kernels must give the same tokens on any CPU."""
    name = default_decoder(model.spec)
    config_type, generate = DECODERS[name]
    config = config_type(**(SHORT[name] | overrides))
    recorder = MarginRecorder(model)
    tokens = generate(recorder, model.spec, prompts, config).output_ids
    if margins and next(model.parameters()).dtype == torch.float32:
        recorder.assert_clear(reduction=96)
    return config, tokens


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    """(family, backend) -> artifact directory, each compiled once for the whole module."""
    root = tmp_path_factory.mktemp("artifacts")
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, backend: str) -> Path:
        if (family, backend) not in built:
            out = root / f"{family}-{backend}"
            built[family, backend] = compile_model(checkpoints[family], BACKEND_RECIPES[backend], out)
        return built[family, backend]

    return get


@pytest.mark.parametrize("backend", list(BACKEND_RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_artifact_reproduces_reference_tokens(family, backend, artifacts, checkpoints):
    engine = dlmc.runtime.load(artifacts(family, backend))
    assert engine.manifest["backend"]["name"] == backend and engine.manifest["exact"]
    model = load_model(checkpoints[family])
    for label, prompts in PROMPTS.items():
        config, expected = reference_tokens(model, prompts)
        assert engine.generate(prompts, config=config).output_ids == expected, label


def test_stages_are_reported_in_order(checkpoints, tmp_path):
    stages = []
    compile_model(checkpoints["llada"], RECIPES / "cpu-eager.yaml", tmp_path / "out", on_stage=stages.append)
    assert stages == ["load", "capture", "pass fold_constants", "lower eager", "verify", "save"]


def test_same_dtype_fidelity_in_bfloat16(checkpoints, tmp_path):
    recipe = load_recipe(RECIPES / "cpu-eager.yaml")
    recipe = Recipe(capture=type(recipe.capture)(dtype="bfloat16"), passes=recipe.passes, lower=recipe.lower)
    engine = dlmc.runtime.load(compile_model(checkpoints["dream"], recipe, tmp_path / "out"))
    assert engine.signature.outputs[0].dtype == "bfloat16"
    model = load_model(checkpoints["dream"], dtype=torch.bfloat16)
    prompts = PROMPTS["batch 2, left-padded"]
    config, expected = reference_tokens(model, prompts, temperature=0.7)
    assert engine.generate(prompts, config=config, seed=0).output_ids == expected


def test_an_approximate_pass_matches_its_eager_oracle(checkpoints, tmp_path):
    recipe = Recipe(passes=(MixedPrecision(dtype="bfloat16"),), lower=EagerSettings())
    engine = dlmc.runtime.load(compile_model(checkpoints["llada"], recipe, tmp_path / "out"))
    assert engine.manifest["exact"] is False
    assert engine.manifest["passes"] == [{"name": "mixed_precision", "version": 1, "exact": False}]
    model = load_model(checkpoints["llada"])
    prompts = PROMPTS["batch 2, left-padded"]
    with LowPrecisionMatmuls(torch.bfloat16):  # the artifact's bf16 matmuls on the same values: same kernels
        config, expected = reference_tokens(model, prompts, margins=False)
    assert engine.generate(prompts, config=config).output_ids == expected


def assert_one_line_and_nothing_written(info, tmp_path: Path, fragment: str) -> None:
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == [], "partial output left behind"


def test_bad_recipe_fails_before_loading_anything(checkpoints, tmp_path):
    bad = tmp_path.parent / f"{tmp_path.name}-bad.yaml"
    bad.write_text(
        "passes: [{layer_skip: {}}, {fold_constants: {max_bytes: big}}]\nlower: {backend: onnxrt, opset: 9}\n"
    )
    with pytest.raises(RecipeError) as info:
        compile_model(checkpoints["llada"], bad, tmp_path / "out")
    assert len(info.value.problems) == 3
    assert_one_line_and_nothing_written(info, tmp_path, "passes[0].layer_skip.layers: give exactly one of")


def test_missing_backend_package_names_the_extra(checkpoints, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(DlmcError) as info:
        compile_model(checkpoints["llada"], RECIPES / "cpu-onnxrt.yaml", tmp_path / "out")
    assert_one_line_and_nothing_written(info, tmp_path, "needs the package(s) onnxruntime (pip install 'dlmc[onnx]')")


@torch.library.custom_op("dlmc_test::opaque_mlp", mutates_args=())
def opaque_mlp(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def test_unexportable_model_names_the_op_and_writes_nothing(checkpoints, tmp_path, monkeypatch):
    import dlmc.compiler

    def load_broken(*args, **kwargs):
        model = load_model(*args, **kwargs)
        model.layers[1].mlp.forward = lambda x: opaque_mlp(x)
        return model

    monkeypatch.setattr(dlmc.compiler, "load_model", load_broken)
    with pytest.raises(DlmcError) as info:
        compile_model(checkpoints["wedlm"], RECIPES / "cpu-eager.yaml", tmp_path / "out")
    assert_one_line_and_nothing_written(info, tmp_path, "dlmc_test::opaque_mlp")


def test_existing_output_is_kept_unless_forced(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DlmcError, match="already exists"):
        compile_model(checkpoints["llada"], RECIPES / "cpu-eager.yaml", out)
    assert (out / "keep.txt").read_text() == "mine"
    compile_model(checkpoints["llada"], RECIPES / "cpu-eager.yaml", out, force=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_missing_model_dir_is_one_line(tmp_path):
    with pytest.raises(DlmcError, match="not a model directory"):
        compile_model(tmp_path / "nope", None, tmp_path / "out")


def test_manifest_summary_names_what_inspect_shows(artifacts):
    from dlmc.artifact import read_manifest
    from dlmc.summary import summarize

    lines = summarize(read_manifest(artifacts("sdar", "onnxrt")))
    assert lines["family"] == "sdar" and lines["attention"] == "block_causal (block size 4)"
    assert lines["backend"] == "onnxrt on cpu" and lines["passes"] == "fold_constants"
    assert lines["inputs"].startswith("input_ids[batch,seq] int64")
    assert lines["shapes"] == "batch 1-16, seq 2-512"
    assert "model.onnx" in lines["size"] and "weights.safetensors" in lines["size"]
