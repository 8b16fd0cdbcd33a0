"""ServedModel's decode settings: a server stops at EOS unless the request says otherwise."""

import dataclasses

import pytest
from fastapi.testclient import TestClient

from dlmc.serve import ServeSettings, create_app
from dlmc.serve.openai_types import ApiError
from tests.serve.conftest import NAME

PROMPT = "add 32+96:"


def test_stop_at_eos_is_on_unless_the_request_turns_it_off(served):
    ids = [served.tokenizer.encode(PROMPT)]
    options = {"gen_length": 32, "block_length": 8}
    on = served.decode_key(None, options, 0, ids)
    off = served.decode_key(None, options | {"stop_at_eos": False}, 0, ids)
    assert on.config.stop_at_eos and not off.config.stop_at_eos
    assert on.config == dataclasses.replace(off.config, stop_at_eos=True)
    stopped, full = served.run(ids, on)[0], served.run(ids, off)[0]
    assert stopped.text == full.text and stopped.finish_reason == full.finish_reason == "stop"
    assert stopped.nfe < full.nfe == 32  # the embedded model answers in a few tokens, then says EOS
    # block and wedlm always stop at a stop token: they have no switch and get none, so the request
    # passes the option check and fails only on the model (this one is not causal)
    with pytest.raises(ApiError, match="WeDLM decoding needs a causal model"):
        served.decode_key("wedlm", {"gen_length": 8}, 0, ids)


def test_the_request_field_reaches_the_decoder(served):
    seen, run = [], served.run

    def recording(prompts, key, on_canvas=None):
        seen.append(key.config.stop_at_eos)
        return run(prompts, key, on_canvas)

    served.run = recording
    with TestClient(create_app(served, ServeSettings())) as client:
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 32, "block_length": 8}
        answers = [client.post("/v1/completions", json=body | flag) for flag in ({}, {"stop_at_eos": False})]
        assert [a.status_code for a in answers] == [200, 200] and seen == [True, False]
        assert answers[0].json()["choices"] == answers[1].json()["choices"]
        bad = client.post("/v1/completions", json=body | {"stop_at_eos": "sometimes"})
        assert bad.status_code == 400 and "stop_at_eos" in bad.text
