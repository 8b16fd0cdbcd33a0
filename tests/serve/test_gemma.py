"""Serving the DiffusionGemma fixture, eagerly and as a compiled artifact (two programs): the completion is
the diffusion_gemma decoder's, the request's decoder options reach it, and an option it does not have is a
400 naming it."""

import pytest
import torch
from fastapi.testclient import TestClient

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.diffusion_gemma import DiffusionGemmaConfig
from dlmc.generation import generate
from dlmc.models import load_model
from dlmc.serve import ServedModel, ServeSettings, create_app
from dlmc.testing.gemma_fixtures import write_gemma_checkpoint
from dlmc.tokenizer import load_tokenizer

PROMPT = "hello"
OPTIONS = {"max_denoising_steps": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_gemma_checkpoint(tmp_path_factory.mktemp("gemma"), dtype=torch.float64)


@pytest.fixture(scope="module", params=["eager", "artifact"])
def served(request, checkpoint, tmp_path_factory):
    if request.param == "eager":
        model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
        return ServedModel(model, model.spec, tokenizer, {}, "gemma")
    artifact = compile_model(checkpoint, "recipes/cpu-eager.yaml", tmp_path_factory.mktemp("a") / "art")
    engine = dlmc.runtime.load(artifact)
    return ServedModel(engine, engine.spec, engine.tokenizer, engine.manifest.get("decode") or {}, "gemma")


def test_completion_is_the_decoders(served):
    ids = served.tokenizer.encode(PROMPT)
    config = DiffusionGemmaConfig(max_new_tokens=8, **OPTIONS)
    # float64 weights: eager and the eager-lowered programs decide the same on this short run
    expected = generate(served.model, served.spec, served.tokenizer, [ids], "diffusion_gemma", config, seed=4)[0]
    with TestClient(create_app(served, ServeSettings())) as client:
        body = {"model": "gemma", "prompt": PROMPT, "max_tokens": 8, "seed": 4} | OPTIONS
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected.text
        refused = client.post("/v1/completions", json=body | {"block_length": 4})
        assert refused.status_code == 400 and "block_length" in refused.json()["error"]["message"]
