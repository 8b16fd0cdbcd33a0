"""The official `openai` client against a real socket: completions, chat, streaming (the pieces add
up to the non-streamed text), decoder settings as extra_body, errors, batching and disconnects."""

import threading

import httpx
import openai
import pytest

from tests.serve.conftest import NAME, Gate, running

SMALL = {"max_tokens": 16, "extra_body": {"steps": 16}}


@pytest.fixture
def server(served):
    with running(served) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0), url


def test_completion_chat_and_models(server):
    client, _ = server
    assert [m.id for m in client.models.list()] == [NAME]
    completion = client.completions.create(model=NAME, prompt="count 417:", **SMALL)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.prompt_tokens == 10
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "count 417:"}], **SMALL)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == completion.choices[0].text  # no template: the message's text


@pytest.mark.parametrize("extra", [{"steps": 16}, {"threshold": 0.9, "block_length": 8}, {"steps": 8}])
def test_stream_pieces_add_up_to_the_text(server, extra):
    client, _ = server
    args = {"model": NAME, "prompt": "count 417:", "max_tokens": 16, "extra_body": extra, "seed": 1}
    whole = client.completions.create(**args).choices[0]
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason
    assert len(chunks) > 2  # the settled prefix arrived step by step, not all at the end


def test_chat_stream_and_sampling(server):
    client, _ = server
    args = dict(model=NAME, messages=[{"role": "user", "content": "reverse ABC:"}], temperature=0.8, seed=5, **SMALL)
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 0


def test_errors_are_the_clients_exceptions(server):
    client, _ = server
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="count 417:", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="count 417:", max_tokens=16)


def test_concurrent_requests_batch_and_match_their_solo_answers(served):
    prompts = ["count 417:", "shift abc:", "reverse HELLO:", "add 12+30:", "count 800:"]
    with running(served) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        solo = [client.completions.create(model=NAME, prompt=p, **SMALL).choices[0].text for p in prompts]
        gate = Gate(served)  # the next batch waits: the others queue behind it
        answers = [None] * len(prompts)

        def ask(i):
            answers[i] = client.completions.create(model=NAME, prompt=prompts[i], **SMALL).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        threads[0].start()
        assert gate.entered.wait(10)
        for t in threads[1:]:
            t.start()
        while httpx.get(f"{url}/health").json()["queued"] < len(prompts) - 1:
            pass
        gate.open()
        for t in threads:
            t.join(30)
    assert gate.batches == [1, len(prompts) - 1]  # joined at the next batch, not the next step
    assert answers == solo


def test_a_client_that_leaves_while_queued_is_dropped(served):
    with running(served) as url:
        gate = Gate(served)
        body = {"model": NAME, "prompt": "count 417:", "max_tokens": 16}
        first = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",), kwargs={"json": body, "timeout": 30})
        first.start()
        assert gate.entered.wait(10)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{url}/v1/completions", json=body | {"prompt": "shift abc:"}, timeout=0.5)
        while httpx.get(f"{url}/health").json()["queued"]:  # the server saw the disconnect
            pass
        gate.open()
        first.join(30)
        assert gate.batches == [1] and httpx.get(f"{url}/health").json()["batch_sizes"] == {"1": 1}
