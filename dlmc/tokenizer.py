"""Tokenizers from a checkpoint directory, with the `tokenizers` library only (no transformers,
no remote code): tokenizer.json when present, else Qwen-style vocab.json + merges.txt; with the chat
template of chat_template.jinja or tokenizer_config.json when it has one (see dlmc.chat)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from dlmc.chat import ChatTemplate
from dlmc.errors import DlmcError
from dlmc.files import read_json

# The pre-tokenizer split shared by every Qwen2/2.5/3 tokenizer.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None = None):
        self._tok = tokenizer
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, adding no special tokens; special-token strings in it (e.g. <|im_start|>)
        become their ids."""
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # a WordLevel vocabulary without its unknown token cannot spell the rest
            bad = next((c for c in dict.fromkeys(text) if not self._spells(c)), None)
            where = f"character {bad!r}" if bad is not None else repr(text[:40])
            raise DlmcError(f"tokenizer: cannot encode {where}: it is not in the vocabulary, and the vocabulary has "
                            f"no unknown token to stand for it ({e})") from None

    def _spells(self, text: str) -> bool:
        try:
            self._tok.encode(text, add_special_tokens=False)
        except Exception:
            return False
        return True

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a conversation through the chat template, with the generation prompt.
        Special tokens come from the template's text only, except the BOS id when the config asks
        for add_bos_token and the text does not already start with it (as transformers' Llama tokenizer)."""
        template = self.chat_template
        if template is None:
            raise DlmcError("this model has no chat template (no chat_template.jinja, no chat_template in "
                            "tokenizer_config.json)")
        text = template.render(messages)
        ids = self.encode(text)
        bos = template.bos_token
        if template.add_bos_token and bos and not text.startswith(bos):
            bos_id = self.token_id(bos)
            if bos_id is None:
                raise DlmcError(f"tokenizer_config.json: bos_token '{bos}' is not in the vocabulary")
            ids = [bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def unk_token_id(self) -> int | None:
        """The id text outside the vocabulary encodes to, if the model has one (byte-level BPE has none)."""
        unk = getattr(self._tok.model, "unk_token", None)
        return self._tok.token_to_id(unk) if unk else None


def load_tokenizer(model_dir: str | Path) -> TextTokenizer | None:
    """The directory's tokenizer, or None when it ships no tokenizer files."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    config_path = model_dir / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    chat = ChatTemplate.load(model_dir, config) if isinstance(config, dict) else None
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise DlmcError(f"{path}: cannot load tokenizer ({e})") from None
        return TextTokenizer(tok, chat)
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return TextTokenizer(_qwen_bpe(model_dir, vocab, merges), chat)
    return None


def _qwen_bpe(model_dir: Path, vocab: Path, merges: Path) -> Tokenizer:
    try:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise DlmcError(f"{vocab}: cannot load BPE vocabulary ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added: dict[str, int] = {}
    if (model_dir / "added_tokens.json").is_file():
        added.update(read_json(model_dir / "added_tokens.json"))
    if (model_dir / "tokenizer_config.json").is_file():
        for token_id, entry in (read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
            added.setdefault(entry["content"], int(token_id))
    for content, token_id in sorted(added.items(), key=lambda kv: kv[1]):
        if tok.get_vocab_size(with_added_tokens=True) != token_id:
            # tokenizers assigns ids in order; a gap means the files disagree with each other.
            raise DlmcError(f"{model_dir}: added token '{content}' has id {token_id}, expected contiguous ids")
        tok.add_special_tokens([content])
    return tok
