"""Streaming a dLLM's answer: only its settled left prefix, as text pieces that add up to the answer.

A diffusion decoder fills positions out of order, so the text a client may see after a step is the
prefix of the generation up to the first still-masked position, cut at the first stop token. Decoders
never change a decided position, so that prefix only grows.
"""

from __future__ import annotations

from dlmc.tokenizer import TextTokenizer


def settled(row: list[int], mask_id: int, stops: set[int]) -> tuple[list[int], bool]:
    """The final left prefix of one row's generated ids and whether a stop token ended it (the stop
    token itself is not part of the text)."""
    for i, token in enumerate(row):
        if token == mask_id:
            return row[:i], False
        if token in stops:
            return row[:i], True
    return row, False


class TextStream:
    """Text pieces of a growing prefix of token ids: their concatenation is always a prefix of the
    prefix's text, and `finish` adds what is left of the final text."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.sent = ""

    def update(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        # A prefix can end inside a multi-byte character (U+FFFD for now) or a detokenizer may rewrite
        # the tail when more tokens arrive: hold such text back until it reads as a prefix.
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def finish(self, text: str) -> str:
        """The rest of the final text. Everything sent so far is a prefix of it, since decode of a
        prefix of ids is a prefix of decode of the ids once no character is cut in half."""
        piece = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return piece
