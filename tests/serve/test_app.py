"""Routes through Starlette's TestClient: shapes, every bad request as an OpenAI error body, 429."""

import threading

import pytest
from fastapi.testclient import TestClient

from dlmc.decoding.llada import LLaDAConfig
from dlmc.generation import generate
from dlmc.serve import ServeSettings, create_app
from tests.serve.conftest import NAME, Gate

SMALL = {"model": NAME, "max_tokens": 16, "steps": 16}


@pytest.fixture
def client(served):
    with TestClient(create_app(served, ServeSettings())) as client:
        yield client


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == NAME
    assert client.get("/health").json()["status"] == "ok"


def test_completion_shape_and_batch_of_prompts(client, served):
    alone = [client.post("/v1/completions", json=SMALL | {"prompt": p}).json() for p in ("count 417:", "shift abc:")]
    both = client.post("/v1/completions", json=SMALL | {"prompt": ["count 417:", "shift abc:"]}).json()
    assert both["object"] == "text_completion" and [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["text"] for c in both["choices"]] == [a["choices"][0]["text"] for a in alone]
    model, spec, tokenizer = served.model, served.spec, served.tokenizer
    direct = generate(model, spec, tokenizer, [tokenizer.encode("count 417:")], "llada", LLaDAConfig(gen_length=16))
    assert alone[0]["choices"][0]["text"] == direct[0].text  # what `dlmc run` prints
    assert both["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)


def test_token_id_prompt_is_the_text_prompt(client, served):
    ids = served.tokenizer.encode("count 417:")
    by_ids = client.post("/v1/completions", json=SMALL | {"prompt": ids}).json()
    by_text = client.post("/v1/completions", json=SMALL | {"prompt": "count 417:"}).json()
    assert by_ids["choices"] == by_text["choices"]


BAD = [
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -3}, 400, "max_tokens"),
    ({"max_tokens": 300}, 400, "max_tokens"),  # prompt + 300 > 256
    ({"max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "naïve:"}, 400, "prompt"),  # the embedded tokenizer spells no 'ï'
    ({"prompt": [3, 5]}, 400, None),  # the mask token
    ({"prompt": [999]}, 400, None),  # outside the vocabulary
    ({"decoder": "nope"}, 400, "decoder"),
    ({"remasking": "sideways"}, 400, "remasking"),
    ({"block_length": 5}, 400, "max_tokens"),  # 16 is not a multiple of 5
    ({"threshold": 1.5}, 400, "threshold"),
    ({"temperature": -1}, 400, "temperature"),
    ({"alg": "entropy"}, 400, "alg"),  # Dream's option; the embedded model decodes with llada
    ({"gen_length": 16}, 400, "gen_length"),
    ({"n": 2}, 400, "n"),
    ({"stop": ["\n"]}, 400, "stop"),
]


@pytest.mark.parametrize("change,status,param", BAD, ids=[str(c) for c, _, _ in BAD])
def test_bad_requests_get_an_openai_error(client, change, status, param):
    response = client.post("/v1/completions", json=SMALL | {"prompt": "count 417:"} | change)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert error["param"] == param


def test_bad_chat_and_bad_json(client):
    chat = client.post("/v1/chat/completions", json=SMALL | {"messages": []})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    parts = client.post("/v1/chat/completions", json=SMALL | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert parts.status_code == 400
    broken = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "error" in broken.json()
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    assert client.get("/health").json()["status"] == "ok"  # none of it hurt the server


def test_full_queue_is_429(served):
    gate = Gate(served)
    with TestClient(create_app(served, ServeSettings(max_queue=1))) as client:
        body = SMALL | {"prompt": "count 417:"}
        first = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body})
        first.start()
        assert gate.entered.wait(10)  # the first request runs (and waits): the queue is empty
        second = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": body})
        second.start()
        while client.get("/health").json()["queued"] < 1:
            pass
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        gate.open()
        first.join(30), second.join(30)
