"""DenoiserSpec: what every stage downstream of the loader needs to know about a model, as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

AttentionKind = Literal["bidirectional", "block_causal", "causal"]


@dataclass(frozen=True, kw_only=True)
class DenoiserSpec:
    family: str
    """Family name, e.g. "llada", "dream", "fast_dllm_v2", "sdar", "wedlm"."""
    mask_token_id: int | None
    """None for a family without a mask token (DiffusionGemma noises with uniform random tokens)."""
    attention: AttentionKind
    """bidirectional: every token sees every token; block_causal: a token sees its own block and the
    blocks before it (blocks counted on logical positions); causal: a token sees the rows before it."""
    block_size: int | None
    """Block length of block-causal attention; None for the other kinds."""
    shift_logits: bool
    """True when the prediction for position i is read from output row i-1 (Dream convention)."""
    vocab_size: int
    """Width of the logits (the embedding rows, which may exceed the tokenizer's vocabulary)."""
    max_length: int
    """Longest sequence (prompt + generation) the model supports."""
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    eot_token_id: int | None = None
    """End-of-turn id, where the family has one (LLaDA's <|eot_id|>)."""
    sampler: str | None = None
    """The family's own decoder where attention and alignment do not name it (LLaDA2: "llada2")."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DenoiserSpec:
        return cls(**d)

    def __post_init__(self) -> None:
        if (self.attention == "block_causal") != (self.block_size is not None):
            raise ValueError("block_size is set exactly when attention is block_causal")
