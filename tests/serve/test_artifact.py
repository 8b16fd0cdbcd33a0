"""Serving a compiled artifact: its fused loop answers as `Engine.generate` does, streams its settled
prefix, and a setting the artifact was not compiled for is a 400 naming it."""

import json

import pytest
from fastapi.testclient import TestClient

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig
from dlmc.generation import default_model_dir, generate
from dlmc.recipe import parse_recipe
from dlmc.serve import ServedModel, ServeSettings, create_app


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "fused"
    recipe = parse_recipe({"capture": {"max_batch": 4}, "passes": [{"fold_constants": {}}, {"fuse_decode": {}}],
                           "lower": {"backend": "eager"}})
    compile_model(default_model_dir(), recipe, out)
    return dlmc.runtime.load(out)


def test_fused_artifact(engine):
    served = ServedModel(engine, engine.spec, engine.tokenizer, engine.manifest.get("decode") or {}, "fused")
    assert served.max_batch == 4  # the artifact's largest batch
    body = {"model": "fused", "prompt": "count 417:", "max_tokens": 16, "steps": 16}
    with TestClient(create_app(served, ServeSettings())) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        ids = engine.tokenizer.encode("count 417:")
        assert whole == generate(engine, engine.spec, engine.tokenizer, [ids], "llada", LLaDAConfig(gen_length=16))[0].text
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert len(lines) > 2 and "".join(_text(line) for line in lines) == whole
        refused = client.post("/v1/completions", json=body | {"temperature": 0.5})
        assert refused.status_code == 400 and "temperature=0.5" in refused.json()["error"]["message"]


def _text(line: str) -> str:
    return json.loads(line[len("data: "):])["choices"][0]["text"]
