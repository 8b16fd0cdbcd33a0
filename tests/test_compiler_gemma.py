"""compile_model's DiffusionGemma path: what it refuses (one line, nothing written) and what the manifest
records of its two programs. (Token identity of the artifacts: tests/runtime/test_gemma_loop.py.)"""

import json

import pytest
import torch

from dlmc.summary import summarize
from dlmc.compiler import compile_model
from dlmc.errors import DlmcError
from dlmc.recipe import parse_recipe
from dlmc.testing.gemma_fixtures import write_gemma_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_gemma_checkpoint(tmp_path_factory.mktemp("gemma"))


@pytest.mark.parametrize("passes, name", [
    ([{"fold_constants": {}}, {"layer_skip": {"layers": [1]}}], "layer_skip"),
    ([{"fold_constants": {}}, {"block_cache": {}}], "block_cache"),
])
def test_passes_the_programs_cannot_take_are_one_line(checkpoint, tmp_path, passes, name):
    recipe = parse_recipe({"passes": passes, "lower": {"backend": "eager"}})
    with pytest.raises(DlmcError, match=f"passes: {name} cannot run on the diffusion_gemma programs"):
        compile_model(checkpoint, recipe, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_manifest_records_both_programs(checkpoint, tmp_path):
    passes = [{"fold_constants": {}}, {"fuse_decode": {"decoder": "auto"}}]
    recipe = parse_recipe({"capture": {"max_batch": 2}, "passes": passes, "lower": {"backend": "eager"}})
    manifest = json.loads((compile_model(checkpoint, recipe, tmp_path / "art") / "manifest.json").read_text())
    programs = manifest["programs"]
    assert programs["layout"]["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert programs["layout"]["empty_slots"] == 4 and programs["layout"]["dtype"] == "float32"
    encoder_files = programs["encoder"]["backend"]["files"]
    assert encoder_files == {"graph": "encoder/step.json", "weights": "weights.safetensors"}  # one weights file
    assert manifest["backend"]["files"]["weights"] == "weights.safetensors" and "keys" not in programs["encoder"]
    assert all(name in manifest["files"] for name in programs["encoder"]["backend"]["files"].values())
    encoder_outputs = [t["name"] for t in programs["encoder"]["signature"]["outputs"]]
    assert encoder_outputs == ["keys_0", "keys_1", "keys_2", "values_0", "values_1", "values_2"]
    assert manifest["signature"]["decoder"] == "diffusion_gemma" and manifest["decode"]["decoder"] == "diffusion_gemma"
    assert manifest["signature"]["batch"] == [1, 2] and torch.__version__ == manifest["torch_version"]
    lines = summarize(manifest)
    assert lines["decoder"] == "diffusion_gemma" and lines["encoder program"].startswith("inputs input_ids[batch,seq]")
