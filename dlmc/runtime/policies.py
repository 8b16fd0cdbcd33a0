"""K/V cache policies: per call, which columns a cached step computes and which it reads from the store.

A caching pass records its policy in the step signature (`{"policy": "dual", "block_length": 32}`);
`policy_from_dict` turns that record into one of the classes below. Each class owns its rules: how it
splits a canvas into query columns (computed now) and key columns (read from the store), which
decoders it can serve, and what a recipe's decode defaults must agree with.

- exact: causal and block-causal models. The columns before the first changed one (for block-causal:
  before its block) have the same K/V and logits as last time; recompute the rest. Token-identical.
- prefix (Fast-dLLM v1): at each block's first step a full forward; then only the block and everything
  after it are computed, the prefix K/V frozen for the block.
- dual (Fast-dLLM v1): as prefix, but the masked suffix's K/V are frozen too; only the block is computed.
- window (Window-Diffusion): as dual, and masks further than `window` columns past the block are pruned
  from every step, the block's first one included.
- delayed (dKV-Cache-Decode): a column's K/V are reused once they were computed with its decoded token,
  i.e. one step after it was decoded; masks and just-decoded tokens are recomputed; a full forward every
  `refresh` steps (and at each block start when `block_length` is set).
- prefill (dKV-Cache): the prompt's K/V from the first step, reused; the generation region is computed.
`refresh` (prefix, dual, window) adds a full forward every that many steps within a block. For models
whose logits are shifted by one (Dream), the row before every query column is computed too, since that
row predicts it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec


class Stored(Protocol):
    """What a policy reads of a sequence's store (dlmc.runtime.cache._Sequence)."""

    tokens: torch.Tensor  # [L] int64: the canvas the store belongs to
    positions: torch.Tensor  # [L] int64
    kv_tokens: torch.Tensor  # [L] int64: the token each column's K/V were computed with, -1 = none
    origin: int  # where the generation (and block 0) starts
    block: int  # the decoder's block at the last full forward
    since_refresh: int


@dataclass
class Plan:
    query: torch.Tensor  # [L] bool: rows computed now
    keys: torch.Tensor  # [L] bool: columns attended to from the store (disjoint from query)
    refresh: bool  # the store is rebuilt from this call


@dataclass(frozen=True, kw_only=True)
class CachePolicy:
    name: ClassVar[str]
    block_length: int | None = None
    refresh: int | None = None

    def plan(self, spec: DenoiserSpec, seq: Stored | None, tokens: torch.Tensor, pos: torch.Tensor) -> Plan:
        """Which columns of `tokens` [L] to compute now and which to take from the store."""
        length = len(tokens)
        everything = torch.ones(length, dtype=torch.bool, device=tokens.device)
        origin = seq.origin if seq is not None else first_mask(tokens, spec.mask_token_id)
        block = self.block_of(tokens, spec.mask_token_id, origin)
        visible = self.visible(tokens, spec, origin, block)
        stale = (
            seq is None
            or len(seq.tokens) != length
            or (self.refresh is not None and seq.since_refresh >= self.refresh)
            or (self.block_length is not None and block != seq.block)
        )
        if stale:
            return Plan(visible.clone(), torch.zeros_like(everything), refresh=True)
        query = self.query(spec, seq, tokens, origin, block)
        if spec.shift_logits:
            query[:-1] |= query[1:].clone()  # the row before a query column predicts it
        query &= visible
        return Plan(query, visible & ~query & (seq.kv_tokens >= 0), refresh=False)

    def query(self, spec: DenoiserSpec, seq: Stored, tokens: torch.Tensor, origin: int, block: int) -> torch.Tensor:
        """[L] bool: the columns a step inside the current stretch recomputes."""
        raise NotImplementedError

    def visible(self, tokens: torch.Tensor, spec: DenoiserSpec, origin: int, block: int) -> torch.Tensor:
        """[L] bool: the columns a step sees at all (every one but where a policy prunes)."""
        return torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)

    def block_of(self, tokens: torch.Tensor, mask_id: int, origin: int) -> int:
        """The decoder's current block: the one holding the leftmost mask (-1 without blocks)."""
        if self.block_length is None:
            return -1
        return max(0, (first_mask(tokens, mask_id) - origin) // self.block_length)

    def block_span(self, origin: int, block: int, length: int) -> tuple[int, int]:
        start = min(origin + block * self.block_length, length)
        return start, min(start + self.block_length, length)

    def to_dict(self) -> dict[str, Any]:
        """The record a step signature keeps (unset options left out)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"policy": self.name} | {k: v for k, v in fields.items() if v is not None}

    def check_decoder(self, decoder: str, config: Any) -> None:
        """One line if `decoder` with `config` cannot run under this policy; any decoder by default."""

    def recipe_problems(self, owner: str, decoder: str | None, config: dict[str, Any]) -> list[str]:
        """What a recipe's decode defaults (decoder name, config fields) contradict; `owner` is the
        recipe's caching pass, which the messages name."""
        return []


@dataclass(frozen=True, kw_only=True)
class Exact(CachePolicy):
    name: ClassVar[str] = "exact"

    def plan(self, spec: DenoiserSpec, seq: Stored | None, tokens: torch.Tensor, pos: torch.Tensor) -> Plan:
        everything = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
        if seq is None:
            return Plan(everything, ~everything, refresh=True)
        reusable = unchanged_prefix(spec, seq, tokens, pos)
        if bool(reusable.all()):
            reusable[-1] = False  # an identical canvas: recompute one row so the step has a query
        return Plan(~reusable, reusable, refresh=False)


@dataclass(frozen=True, kw_only=True)
class BlockPolicy(CachePolicy):
    """Freezes everything outside the decoder's current block, so the decoder must stay inside it: the
    llada decoder at this block length."""

    block_length: int

    def check_decoder(self, decoder: str, config: Any) -> None:
        length = getattr(config, "block_length", None) or getattr(config, "gen_length", None)
        if decoder != "llada" or length != self.block_length:
            raise DlmcError(
                f"decoder: this artifact's {self.name} cache works with the llada decoder at block_length "
                f"{self.block_length}; got {decoder} with block_length {length}"
            )
        strategy = getattr(config, "strategy", None)
        if strategy is not None and strategy.rule.sees_generation:
            raise DlmcError(f"strategy: {strategy.name} reads every generated position each step; this artifact's "
                            f"{self.name} cache freezes everything outside the block")

    def recipe_problems(self, owner: str, decoder: str | None, config: dict[str, Any]) -> list[str]:
        if decoder is None:
            return []
        if decoder != "llada":
            return [f"decode.decoder: {owner} follows the llada decoder's blocks, not {decoder}'s"]
        block = config.get("block_length") or config.get("gen_length")
        if block != self.block_length:
            return [f"decode.block_length: {block} differs from {owner}.block_length {self.block_length}"]
        return []


@dataclass(frozen=True, kw_only=True)
class Prefix(BlockPolicy):
    name: ClassVar[str] = "prefix"
    suffix: ClassVar[bool] = True
    """The masked suffix after the block is computed every step too."""

    def query(self, spec, seq, tokens, origin, block):
        start, end = self.block_span(origin, block, len(tokens))
        query = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        query[start : len(tokens) if self.suffix else end] = True
        return query


@dataclass(frozen=True, kw_only=True)
class Dual(Prefix):
    name: ClassVar[str] = "dual"
    suffix: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class Window(Dual):
    name: ClassVar[str] = "window"
    window: int

    def visible(self, tokens, spec, origin, block):
        _, end = self.block_span(origin, block, len(tokens))
        beyond = torch.arange(len(tokens), device=tokens.device) >= end
        far = (tokens == spec.mask_token_id) & beyond
        return ~(far & (far.cumsum(0) > self.window))  # masks past the first `window` after the block

    def check_decoder(self, decoder: str, config: Any) -> None:
        super().check_decoder(decoder, config)
        if self.window + self.block_length > config.gen_length:
            raise DlmcError(
                f"decoder: window {self.window} plus block {self.block_length} exceeds gen_length "
                f"{config.gen_length}; nothing would be pruned"
            )

    def recipe_problems(self, owner: str, decoder: str | None, config: dict[str, Any]) -> list[str]:
        problems = super().recipe_problems(owner, decoder, config)
        if not problems and decoder is not None and self.window + self.block_length > config["gen_length"]:
            problems.append(
                f"passes: {owner}.window {self.window} plus block_length {self.block_length} exceeds "
                f"decode.gen_length {config['gen_length']}; nothing would be pruned"
            )
        return problems


@dataclass(frozen=True, kw_only=True)
class Delayed(CachePolicy):
    name: ClassVar[str] = "delayed"

    def query(self, spec, seq, tokens, origin, block):
        masks = tokens == spec.mask_token_id
        return ~((seq.kv_tokens == tokens) & ~masks)  # masks and tokens decoded since their K/V were made


@dataclass(frozen=True, kw_only=True)
class Prefill(CachePolicy):
    name: ClassVar[str] = "prefill"

    def query(self, spec, seq, tokens, origin, block):
        return torch.arange(len(tokens), device=tokens.device) >= seq.origin  # the generation region


POLICIES: dict[str, type[CachePolicy]] = {p.name: p for p in (Exact, Prefix, Dual, Window, Delayed, Prefill)}
"""Closed registry: the name a caching pass records -> its policy class."""


def policy_from_dict(record: dict[str, Any]) -> CachePolicy:
    """The policy a step signature records, e.g. {"policy": "dual", "block_length": 32}."""
    cls = POLICIES.get(record.get("policy"))
    if cls is None:
        raise DlmcError(f"signature.cache.policy: unknown policy {record.get('policy')!r} (known: {', '.join(POLICIES)})")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names and v is not None})


def first_mask(tokens: torch.Tensor, mask_id: int) -> int:
    hits = (tokens == mask_id).nonzero()
    return int(hits[0, 0]) if len(hits) else len(tokens)


def unchanged_prefix(spec: DenoiserSpec, seq: Stored, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[L] bool: columns whose stored K/V and logits are exactly what this canvas would compute."""
    length, n = len(tokens), min(len(tokens), len(seq.tokens))
    same = (tokens[:n] == seq.tokens[:n]) & (pos[:n] == seq.positions[:n]) & (seq.kv_tokens[:n] >= 0)
    first = int(same.logical_not().nonzero()[0, 0]) if not bool(same.all()) else n
    reusable = torch.zeros(length, dtype=torch.bool, device=tokens.device)
    reusable[:first] = True
    if spec.attention == "block_causal" and first < length:
        # A column's K/V depend on every column of its block and earlier ones: drop the changed blocks.
        blocks = torch.div(pos, spec.block_size, rounding_mode="floor")  # [L]
        reusable &= blocks < blocks[first:].min()
    return reusable
