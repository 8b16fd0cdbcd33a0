"""A broken mixture-of-experts checkpoint gives a DlmcError whose one line names the file or field."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmc.testing.fixtures import write_checkpoint
from tests.helpers import edit_config, expect_error


@pytest.fixture
def llada2(tmp_path):
    return write_checkpoint("llada2", tmp_path / "m", layers=2)


def shard_of(path, name):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


@pytest.mark.parametrize(
    "family, field", [("llada2", "n_group"), ("llada2", "moe_intermediate_size"), ("llada_moe", "moe_layer_freq"),
                      ("sdar_moe", "num_experts")]
)
def test_missing_moe_field(tmp_path, family, field):
    path = write_checkpoint(family, tmp_path / "m", layers=2)
    edit_config(path, **{field: None})
    expect_error(path, "config.json", f"missing field '{field}' needed by the {family} family")


def test_missing_expert_tensor(llada2):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    shard = shard_of(llada2, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    index = json.loads((llada2 / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (llada2 / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(llada2, f"missing tensor '{name}'")


def test_misshapen_expert_tensor(llada2):
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    shard = shard_of(llada2, name)
    tensors = load_file(shard)
    tensors[name] = torch.zeros(64, 31)
    save_file(tensors, shard)
    expect_error(llada2, shard.name, name, "[64, 31]", "[64, 32]")


def test_more_experts_per_token_than_experts(llada2):
    edit_config(llada2, num_experts_per_tok=9)
    expect_error(llada2, "config.json", "'num_experts_per_tok' (9) exceeds 'num_experts' (8)")


def test_groups_that_do_not_divide_the_experts(llada2):
    edit_config(llada2, n_group=3)
    expect_error(llada2, "config.json", "'n_group' (3) does not divide 'num_experts' (8)")


def test_unsupported_router_option(llada2):
    edit_config(llada2, score_function="softmax")
    expect_error(llada2, "config.json", "'score_function'", "softmax")
