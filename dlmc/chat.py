"""Chat templates: the Jinja2 `chat_template` of a checkpoint (its chat_template.jinja file, else the
field of its tokenizer_config.json), rendered as
Hugging Face transformers renders it (a sandboxed environment with trim_blocks and lstrip_blocks,
`raise_exception`, a JSON `tojson`, `messages`, `add_generation_prompt`, `bos_token`, `eos_token`).

Nothing from a checkpoint runs outside jinja2's ImmutableSandboxedEnvironment. The template is
compiled on first use, so a broken template fails the chat request or `dlmc run --chat` that uses it
(a DlmcError naming `tokenizer_config.json: chat_template` or `chat_template.jinja`), never the loading
of the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dlmc.errors import DlmcError, one_line

WHERE = "tokenizer_config.json: chat_template"
TEMPLATE_FILE = "chat_template.jinja"
"""Where newer checkpoints keep the template, next to tokenizer_config.json. When both are present the
file wins, as in transformers (which reads it since v4.47 and lets it override the config's field)."""


class _RaisedByTemplate(Exception):
    """What the template's raise_exception(message) raises."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an {"content": ...} object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class ChatTemplate:
    source: Any
    """The config's chat_template: a string, or a list of {"name", "template"} of which "default" is used."""
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    """tokenizer_config.json's add_bos_token: the BOS id goes first unless the rendered text starts with it."""
    where: str = WHERE
    """Where the template came from, for error messages."""
    _compiled: Any = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: dict) -> ChatTemplate | None:
        """The template of a parsed tokenizer_config.json, or None when it has none."""
        source = config.get("chat_template")
        if source is None:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                   config.get("add_bos_token") is True)

    @classmethod
    def load(cls, model_dir: Path, config: dict) -> ChatTemplate | None:
        """The template of a tokenizer directory: chat_template.jinja when present, else the field of its
        parsed tokenizer_config.json `config`; special tokens come from the config either way."""
        path = model_dir / TEMPLATE_FILE
        if not path.is_file():
            return cls.from_config(config)
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DlmcError(f"{path}: not UTF-8 text") from None
        template = cls.from_config(config | {"chat_template": source})
        template.where = TEMPLATE_FILE
        return template

    def _template(self):
        if self._compiled is not None:
            return self._compiled
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        source = self.source
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            if "default" not in named:
                names = ", ".join(map(str, named))
                raise DlmcError(f"{self.where}: a list of templates without one named 'default' ({names})")
            source = named["default"]
        if not isinstance(source, str):
            raise DlmcError(f"{self.where}: expected a string, got {type(source).__name__}")

        def raise_exception(message):
            raise _RaisedByTemplate(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(format):
            return datetime.now().strftime(format)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self._compiled = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise DlmcError(f"{self.where}: line {e.lineno}: {e.message}") from None
        return self._compiled

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the template writes it; any error in the template is a DlmcError."""
        template = self._template()
        variables: dict[str, Any] = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        try:
            return template.render(**variables)
        except _RaisedByTemplate as e:
            raise DlmcError(f"{self.where}: {e}") from None
        except Exception as e:  # undefined values, the sandbox's refusals, a TypeError in an expression
            raise DlmcError(f"{self.where}: {one_line(e)}") from None
