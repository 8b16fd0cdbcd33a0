"""Every broken checkpoint gives a DlmcError whose one line names the file or field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmc.models import load_model
from dlmc.testing.fixtures import write_checkpoint
from tests.helpers import edit_config, expect_error


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint("llada", tmp_path / "m")


def first_shard(path):
    return path / "model-00001-of-00002.safetensors"


def test_unknown_architecture(ckpt):
    edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    expect_error(ckpt, "config.json", "GPT2LMHeadModel", "LLaDAModelLM")


def test_llada_moe_is_not_taken_for_llada(ckpt):
    edit_config(ckpt, architectures=["LLaDAMoEModelLM"])  # model_type stays "llada"
    expect_error(ckpt, "missing field 'hidden_size' needed by the llada_moe family")


def test_missing_config_field(ckpt):
    edit_config(ckpt, n_layers=None)
    expect_error(ckpt, "config.json", "'n_layers'")


def test_missing_config_file(ckpt):
    (ckpt / "config.json").unlink()
    expect_error(ckpt, "config.json", "not found")


def test_missing_shard(ckpt):
    first_shard(ckpt).unlink()
    expect_error(ckpt, "model-00001-of-00002.safetensors", "missing")


def test_truncated_shard(ckpt):
    data = first_shard(ckpt).read_bytes()
    first_shard(ckpt).write_bytes(data[: len(data) // 2])
    expect_error(ckpt, "model-00001-of-00002.safetensors")


def test_wrong_shape(ckpt):
    tensors = load_file(first_shard(ckpt))
    tensors["model.transformer.wte.weight"] = torch.zeros(10, 64)
    save_file(tensors, first_shard(ckpt))
    expect_error(ckpt, "model-00001-of-00002.safetensors", "model.transformer.wte.weight", "[10, 64]", "[272, 64]")


def test_wrong_name(ckpt):
    tensors = load_file(first_shard(ckpt))
    tensors["model.transformer.wte.weights"] = tensors.pop("model.transformer.wte.weight")
    save_file(tensors, first_shard(ckpt))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.transformer.wte.weights"] = index["weight_map"].pop("model.transformer.wte.weight")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(ckpt, "model.transformer.wte.weight")


def test_unsupported_option(ckpt):
    edit_config(ckpt, block_type="sequential")
    expect_error(ckpt, "block_type", "sequential")


def test_no_weights(ckpt):
    for f in ckpt.glob("model*"):
        f.unlink()
    expect_error(ckpt, "model.safetensors.index.json")


def test_single_file_checkpoint(tmp_path):
    path = write_checkpoint("sdar", tmp_path / "s", shards=1)
    assert load_model(path).num_parameters() > 0


def test_not_a_directory(tmp_path):
    expect_error(tmp_path / "nope", "not a model directory")


def test_copy_is_independent(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "copy")
    assert load_model(tmp_path / "copy").spec.family == "llada"


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_inspect_names_a_truncated_shard(ckpt, keep):
    """`dlmc inspect` reads no weights, so only the header check can tell the download was cut short."""
    from typer.testing import CliRunner

    from dlmc.cli import app

    shard = first_shard(ckpt)
    shard.write_bytes(shard.read_bytes()[:keep])
    result = CliRunner().invoke(app, ["inspect", str(ckpt)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {shard}: ") and len(result.stderr.strip().splitlines()) == 1


def test_a_truncated_single_file_checkpoint(tmp_path):
    path = write_checkpoint("sdar", tmp_path / "s", shards=1)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    expect_error(path, "model.safetensors: truncated")
