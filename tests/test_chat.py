"""Chat templates (dlmc.chat): exact renderings of the Llama-3 (LLaDA) and ChatML (Qwen) shapes,
special tokens as ids, BOS handling, the sandbox, one-line errors, `dlmc run --chat` and the serve
chat endpoint. Tiny eager checkpoints only."""

import json

import pytest

import dlmc.runtime
from fastapi.testclient import TestClient

from dlmc.chat import ChatTemplate
from dlmc.compiler import compile_model
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from dlmc.serve import ServedModel, ServeSettings, create_app
from dlmc.testing.fixtures import CHAT_TEMPLATES, special_ids, write_checkpoint
from dlmc.tokenizer import load_tokenizer
from tests.test_cli import invoke

TINY = {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 16, "shards": 1}
ONE = [{"role": "user", "content": "hi"}]
MANY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
]


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return write_checkpoint("llada", tmp_path_factory.mktemp("llada"), chat_template=CHAT_TEMPLATES["llama3"], **TINY)


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return write_checkpoint("dream", tmp_path_factory.mktemp("dream"), chat_template=CHAT_TEMPLATES["chatml"], **TINY)


def with_config(path, **changes):
    """The tokenizer of `path` after changing fields of its tokenizer_config.json."""
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | changes))
    try:
        return load_tokenizer(path)
    finally:
        config_path.write_text(json.dumps(config))


def text_ids(text):
    return list(text.encode())  # the fixtures' byte vocabulary: id = byte


def test_llama3_shape(llada):
    tok = load_tokenizer(llada)
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    user, assistant = head.format("user"), head.format("assistant")
    assert tok.chat_template.render(ONE) == "<|startoftext|>" + user + "hi<|eot_id|>" + assistant
    assert tok.chat_template.render(MANY) == "<|startoftext|>" + "".join(
        head.format(m["role"]) + m["content"] + "<|eot_id|>" for m in MANY
    ) + assistant
    sp = special_ids("llada")
    start, end, eot = sp["<|start_header_id|>"], sp["<|end_header_id|>"], sp["<|eot_id|>"]
    assert tok.encode_chat(ONE) == [
        sp["<|startoftext|>"], start, *text_ids("user"), end, *text_ids("\n\nhi"), eot,
        start, *text_ids("assistant"), end, *text_ids("\n\n"),
    ]


def test_chatml_shape(dream):
    tok = load_tokenizer(dream)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert tok.chat_template.render(ONE) == system + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template.render(MANY) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    sp = special_ids("dream")
    start, end = sp["<|im_start|>"], sp["<|im_end|>"]
    ids = tok.encode_chat(ONE)
    assert ids[:8] == [start, *text_ids("system\n")] and ids.count(start) == 3 and ids.count(end) == 2
    assert ids[-len(text_ids("assistant\n")) - 1:] == [start, *text_ids("assistant\n")]


def test_bos_added_once(llada):
    bos = special_ids("llada")["<|startoftext|>"]
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_tokenizer(llada).encode_chat(ONE)[:2] != [bos, bos]  # the template writes it; add_bos_token is false
    assert with_config(llada, chat_template=plain).encode_chat(ONE) == text_ids("hi")
    assert with_config(llada, chat_template=plain, add_bos_token=True).encode_chat(ONE) == [bos, *text_ids("hi")]
    already = with_config(llada, add_bos_token=True).encode_chat(ONE)
    assert already[0] == bos and already[1] != bos
    as_dict = with_config(llada, chat_template=plain, add_bos_token=True, bos_token={"content": "<|startoftext|>"})
    assert as_dict.encode_chat(ONE) == [bos, *text_ids("hi")]


def test_named_templates_and_tojson():
    tool_use = {"name": "tool_use", "template": "x"}
    named = ChatTemplate([tool_use, {"name": "default", "template": "{{ messages | tojson }}"}])
    assert named.render(ONE) == '[{"role": "user", "content": "hi"}]'
    with pytest.raises(DlmcError, match="chat_template: a list of templates without one named 'default'"):
        ChatTemplate([tool_use]).render(ONE)


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ messages.__class__.__subclasses__() }}", "unsafe"),
        ("{{ raise_exception('only user and assistant\nroles') }}", "chat_template: only user and assistant\\nroles"),
        ("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", "chat_template: line 2:"),
        ("{{ nope.field }}", "'nope' is undefined"),
        ("{% set x = messages.append(1) %}", "unsafe"),  # immutable: the sandbox refuses to mutate
    ],
)
def test_template_errors_are_one_line(source, fragment):
    with pytest.raises(DlmcError) as e:
        ChatTemplate(source).render(ONE)
    message = str(e.value)
    assert "\n" not in message and message.startswith("tokenizer_config.json: chat_template: ")
    assert fragment in message


def test_sandbox_hides_unsafe_attributes():
    assert ChatTemplate("[{{ messages.__class__ }}]").render(ONE) == "[]"


def test_run_chat(llada):
    args = ["run", llada, "--prompt", "hi", "--gen-length", 4, "--steps", 2, "--block-length", 4, "--json"]
    result = invoke(*args, "--chat")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_ids"] == load_tokenizer(llada).encode_chat(ONE)
    assert json.loads(invoke(*args).stdout)["prompt_ids"] == text_ids("hi")


def test_run_chat_without_template(tmp_path):
    path = write_checkpoint("llada", tmp_path / "plain", **TINY)
    result = invoke("run", path, "--chat", "--prompt", "hi", "--gen-length", 4, "--steps", 2)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --chat: this model has no chat template (no chat_template.jinja, no chat_template in "
        "tokenizer_config.json)"
    ]


def test_serve_chat_uses_template(llada):
    model = load_model(llada)
    served = ServedModel(model, model.spec, load_tokenizer(llada), {}, "tiny", max_batch=2)
    body = {"model": "tiny", "max_tokens": 4, "steps": 2, "messages": MANY}
    with TestClient(create_app(served, ServeSettings())) as client:
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] == len(served.tokenizer.encode_chat(MANY))
        served.tokenizer.chat_template = ChatTemplate("{{ raise_exception('no system role') }}")
        bad = client.post("/v1/chat/completions", json=body)
        assert bad.status_code == 400
        assert bad.json()["error"]["message"] == "tokenizer_config.json: chat_template: no system role"


def test_chat_template_jinja_file_wins_over_the_config_field(tmp_path):
    """Newer checkpoints ship chat_template.jinja next to tokenizer_config.json; transformers (>= 4.47)
    prefers it to the config's field, and so do we. compile copies it into the artifact."""
    path = write_checkpoint("llada", tmp_path / "jinja", chat_template="{{ 'from the config' }}", **TINY)
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}", "utf-8")
    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template.render(MANY) == "[Be brief.][hi][hello][2+2?]"
    assert tokenizer.encode_chat(ONE) == text_ids("[hi]")
    (path / "chat_template.jinja").write_text("{{ raise_exception('no') }}", "utf-8")
    with pytest.raises(DlmcError, match="^chat_template.jinja: no$"):
        load_tokenizer(path).encode_chat(ONE)
    only_file = write_checkpoint("llada", tmp_path / "only_file", **TINY)
    (only_file / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", "utf-8")
    assert load_tokenizer(only_file).encode_chat(ONE) == text_ids("hi!")
    artifact = compile_model(only_file, parse_recipe({"lower": {"backend": "eager"}}), tmp_path / "artifact")
    assert (artifact / "tokenizer" / "chat_template.jinja").is_file()
    assert dlmc.runtime.load(artifact).tokenizer.encode_chat(ONE) == text_ids("hi!")
