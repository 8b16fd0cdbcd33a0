import json

import pytest
import torch

import dlmc.runtime
from dlmc.capture import CaptureConfig
from dlmc.compiler import compile_model
from dlmc.decoding import DECODERS
from dlmc.decoding.dream import DreamConfig
from dlmc.decoding.llada import LLaDAConfig
from dlmc.errors import DlmcError
from dlmc.lower.eager import EagerSettings
from dlmc.models import load_model
from dlmc.passes.fold_constants import FoldConstants
from dlmc.recipe import DecodeDefaults, Recipe
from tests.helpers import assert_equal_up_to_rounding, padded_batch

DECODE = dict(gen_length=8, steps=4, block_length=8)


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["llada"])


@pytest.fixture(scope="module")
def artifact(checkpoints, tmp_path_factory):
    recipe = Recipe(
        capture=CaptureConfig(max_batch=2),
        passes=(FoldConstants(),),
        lower=EagerSettings(),
        decode=DecodeDefaults(decoder="llada", config=DECODE),
    )
    return compile_model(checkpoints["llada"], recipe, tmp_path_factory.mktemp("engine") / "out")


@pytest.fixture(scope="module")
def engine(artifact):
    return dlmc.runtime.load(artifact)


def test_engine_carries_spec_tokenizer_and_manifest(engine, model):
    assert engine.spec == model.spec
    assert engine.tokenizer is not None and engine.tokenizer.decode(engine.tokenizer.encode("hi")) == "hi"
    assert engine.manifest["backend"]["name"] == "eager"
    assert engine.device == torch.device("cpu")


def test_step_fills_in_mask_and_positions(engine, model):
    ids = torch.randint(0, 250, (2, 10))
    with torch.no_grad():
        expected = model(ids, None, None)
    assert torch.equal(engine.step(ids), expected)
    assert torch.equal(engine(ids, torch.ones(2, 10, dtype=torch.bool), torch.arange(10).expand(2, 10)), expected)


def test_batches_beyond_the_artifact_run_in_chunks(engine, model):
    inputs = padded_batch([3, 11, 11, 7, 2], 11)  # 5 rows, the artifact takes 2 at a time
    with torch.no_grad():
        # Same maths on other GEMM shapes (2 rows at a time, not 5): equal up to rounding.
        assert_equal_up_to_rounding(engine.step(*inputs), model(*inputs), reduction=96)


def test_too_long_is_one_line(engine):
    with pytest.raises(DlmcError, match="sequence length 600 exceeds this artifact's maximum 512"):
        engine.step(torch.zeros(1, 600, dtype=torch.long))


def test_generate_uses_the_artifacts_decode_defaults(engine, model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    out = engine.generate(prompts)
    _, generate = DECODERS["llada"]
    assert out.output_ids == generate(model, model.spec, prompts, LLaDAConfig(**DECODE)).output_ids
    assert all(len(row) == DECODE["gen_length"] for row in out.output_ids)


def test_generate_with_another_decoder_and_progress(engine, model):
    calls = []
    config = DreamConfig(max_new_tokens=6, steps=3)
    out = engine.generate([[5, 6, 7]], decoder="dream", config=config, seed=3, on_step=lambda n, d: calls.append(n))
    _, generate = DECODERS["dream"]
    assert out.output_ids == generate(model, model.spec, [[5, 6, 7]], config, seed=3).output_ids
    assert calls == [1, 2, 3] and out.nfe == 3


def test_generate_rejects_unknown_decoder_and_mismatched_config(engine):
    with pytest.raises(DlmcError, match="unknown decoder 'beam'"):
        engine.generate([[5]], decoder="beam")
    with pytest.raises(DlmcError, match="'dream' takes a DreamConfig, got LLaDAConfig"):
        engine.generate([[5]], decoder="dream", config=LLaDAConfig())


def test_buckets_pad_every_call_and_keep_the_tokens(checkpoints, model, tmp_path):
    recipe = Recipe(capture=CaptureConfig(seq_buckets=(16, 32)), lower=EagerSettings())
    engine = dlmc.runtime.load(compile_model(checkpoints["llada"], recipe, tmp_path / "out"))
    seen = []
    inner = engine._step
    engine._step = lambda *inputs: seen.append(inputs[0].shape[1]) or inner(*inputs)
    inputs = padded_batch([4, 11], 11)
    with torch.no_grad():
        torch.testing.assert_close(engine.step(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    assert seen == [16]
    prompts = [[5, 6, 7, 8], [9, 10]]
    config = LLaDAConfig(**DECODE)
    _, generate = DECODERS["llada"]
    assert engine.generate(prompts, config=config).output_ids == generate(model, model.spec, prompts, config).output_ids
    with pytest.raises(DlmcError, match="exceeds this artifact's maximum 32"):
        engine.step(torch.zeros(1, 33, dtype=torch.long))


def copy_artifact(artifact, tmp_path):
    import shutil

    return shutil.copytree(artifact, tmp_path / "copy")


def test_load_refuses_a_truncated_weights_file(artifact, tmp_path):
    copy = copy_artifact(artifact, tmp_path)
    weights = copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(DlmcError, match=r"weights\.safetensors: size .* \(truncated\?\)"):
        dlmc.runtime.load(copy)


def edit_manifest(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_load_refuses_a_step_interface_it_cannot_drive(artifact, tmp_path):
    copy = copy_artifact(artifact, tmp_path)
    edit_manifest(
        copy, lambda m: m["signature"]["inputs"].append({"name": "kv_cache", "dtype": "float32", "shape": []})
    )
    with pytest.raises(DlmcError, match="inputs this runtime cannot feed \\(kv_cache\\)"):
        dlmc.runtime.load(copy)


def test_load_names_the_missing_backend_package(artifact, tmp_path):
    copy = copy_artifact(artifact, tmp_path)
    edit_manifest(copy, lambda m: m["backend"].update(name="tensorrt"))
    import importlib.util

    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch_tensorrt is installed here")
    with pytest.raises(DlmcError, match="needs torch_tensorrt; pip install 'dlmc\\[trt\\]'"):
        dlmc.runtime.load(copy)


@pytest.mark.parametrize("device", ["foo", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_an_unusable_device_is_one_line(artifact, checkpoints, device):
    for load in (dlmc.runtime.load, lambda path, device: load_model(checkpoints["llada"], device=device)):
        with pytest.raises(DlmcError, match=f"^device: '{device}'"):
            load(artifact, device=device)


def _set(path: str, value):
    """A manifest edit setting the field at a dotted path (list items by index); None removes it."""
    def change(manifest):
        *parents, leaf = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            manifest = manifest[key]
        if value is None:
            del manifest[leaf]
        else:
            manifest[leaf] = value
    return change


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("signature.inputs.2.dtype", None, "signature.inputs[2].dtype: required"),
        ("signature.inputs.2.dtype", "int65", "signature.inputs[2].dtype: 'int65' is not a torch dtype"),
        ("signature.inputs.0.shape", "batch", "signature.inputs[0].shape: expected a list, got a string"),
        ("signature.outputs", {}, "signature.outputs: expected a list, got a mapping"),
        ("signature.batch", [2], "signature.batch: expected [smallest, largest]"),
        ("signature.seq", ["2", 16], "signature.seq[0]: expected an integer, got a string '2'"),
        ("signature.cache", [], "signature.cache: expected a mapping, got a list"),
        ("spec.mask_token_id", None, "spec.mask_token_id: required"),
        ("spec.attention", "sideways", "spec.attention: 'sideways' is not one of"),
        ("spec.shift_logits", 1, "spec.shift_logits: expected a boolean, got an integer 1"),
        ("spec.colour", "red", "spec.colour: unknown option"),
        ("backend.device", "tpu", "backend.device: 'tpu' is not cpu, cuda or cuda:N"),
        ("backend.files.graph", "../../etc/passwd", "backend.files.graph: '../../etc/passwd' is not one of"),
        ("backend.files.weights", None, "backend.files.weights: required by the eager backend"),
        ("backend.state", None, "backend.state: needs the lists parameters, buffers, constants"),
        ("decode", [], "decode: expected a mapping or nothing, got a list"),
        ("passes.0.exact", "yes", "passes[0].exact: expected a boolean, got a string"),
    ],
)
def test_load_names_the_malformed_manifest_field(artifact, tmp_path, path, value, message):
    copy = copy_artifact(artifact, tmp_path)
    edit_manifest(copy, _set(path, value))
    with pytest.raises(DlmcError) as info:
        dlmc.runtime.load(copy)
    assert str(info.value).startswith(f"{copy / 'manifest.json'}: {message}"), str(info.value)
    assert "\n" not in str(info.value)
