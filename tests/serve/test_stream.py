"""The settled prefix, the text pieces built from it, and decoders that stream them step by step."""

import json

import pytest
from fastapi.testclient import TestClient

from dlmc.models import load_model
from dlmc.serve import ServedModel, ServeSettings, create_app
from dlmc.serve.stream import TextStream, settled
from dlmc.tokenizer import load_tokenizer

MASK, EOS, EOT = 3, 0, 2


def test_settled_stops_at_the_first_mask_or_stop_token():
    assert settled([5, 6, MASK, 7], MASK, {EOS, EOT}) == ([5, 6], False)
    assert settled([5, EOT, MASK, 7], MASK, {EOS, EOT}) == ([5], True)  # the stop is final, what follows is not read
    assert settled([5, 6, 7], MASK, {EOS, EOT}) == ([5, 6, 7], False)
    assert settled([MASK, 6], MASK, {EOS}) == ([], False)


class Bytes:
    """A tokenizer whose ids are UTF-8 bytes: a prefix can end inside a character."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_pieces_add_up_and_never_split_a_character():
    ids = list("aé€b".encode())
    stream = TextStream(Bytes())
    pieces = [stream.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.finish("aé€b") == "aé€b"
    assert pieces[1] == "" and pieces[2] == "é"  # held back until the character's second byte arrives


@pytest.mark.parametrize("family", ["sdar", "wedlm"])
def test_block_and_wedlm_stream_step_by_step(checkpoints, family):
    """A block-causal (SDAR) and a causal (WeDLM) model stream their settled prefix in several pieces
    before the end, and the pieces add up to the non-streamed text."""
    model = load_model(checkpoints[family])
    served = ServedModel(model, model.spec, load_tokenizer(checkpoints[family]), {}, family)
    body = {"model": family, "prompt": "count 417:", "max_tokens": 16}
    with TestClient(create_app(served, ServeSettings())) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == whole["text"] and chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert sum(bool(t) for t in texts[:-1]) > 1  # pieces arrived before the end, not all of it at once
