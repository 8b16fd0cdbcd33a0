"""Cache managers: the reference decoders' full-canvas calls, served by a step with K/V cache inputs.

A decoder asks for the logits of whole canvases, one row per sequence it is decoding. The manager keeps,
per sequence, the canvas it last saw, the post-RoPE K/V of every column it has computed (and the token
each was computed with), and the last logits of every row. Each call its policy splits the new canvas
into query columns (computed now, their K/V and logits refreshed) and key columns (attended to from the
store); everything else is pruned. Rows it did not compute keep their last logits, which the decoders
never read where it matters: a policy only freezes rows outside the decoder's active block, or rows
whose logits cannot have changed.

The policies (`dlmc.runtime.policies`) decide the split; the caching passes record one in the step
signature.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dlmc.artifact import StepSignature
from dlmc.errors import DlmcError
from dlmc.runtime.policies import CachePolicy, Plan, first_mask
from dlmc.spec import DenoiserSpec


def empty_cache(signature: StepSignature, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Cache inputs holding one masked-out key per row: the cached step then equals the plain step."""
    layers, _, kv_heads, _, head_dim = _kv_spec(signature).shape
    mask = torch.zeros(batch, 1, dtype=torch.bool, device=device)  # [B, 1]
    positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
    kv = torch.zeros(layers, batch, kv_heads, 1, head_dim, dtype=_kv_dtype(signature), device=device)
    return mask, positions, kv, kv.clone()


@dataclass
class _Sequence:
    tokens: torch.Tensor  # [L] int64: the canvas the store belongs to
    positions: torch.Tensor  # [L] int64
    keys: torch.Tensor  # [layers, kv_heads, L, head_dim]
    values: torch.Tensor  # [layers, kv_heads, L, head_dim]
    kv_tokens: torch.Tensor  # [L] int64: the token each column's K/V were computed with, -1 = none
    logits: torch.Tensor  # [L, V]: the last logits of every row (zeros where never computed)
    origin: int  # the first masked column at the first call: where the generation (and block 0) starts
    block: int = -1  # the decoder's block at the last full forward
    since_refresh: int = 0


@dataclass
class CacheManager:
    """A `model` for the reference decoders: `forward_rows(rows, positions, sequences)` serves each
    sequence from its cache; a plain `model(input_ids, attention_mask, position_ids)` call runs the full
    step uncached."""

    engine: Any  # dlmc.runtime.Engine (not imported: engine imports this module)
    policy: CachePolicy
    _sequences: dict[Hashable, _Sequence] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        return self.engine.step(input_ids, attention_mask, position_ids)

    def forward_rows(
        self,
        rows: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor] | None,
        sequences: Sequence[Hashable],
    ) -> list[torch.Tensor]:
        """Each row's logits [len(row), V]. rows[i] is the whole current canvas of sequences[i]."""
        spec: DenoiserSpec = self.engine.spec
        plans = []
        for i, (tokens, key) in enumerate(zip(rows, sequences, strict=True)):
            pos = positions[i] if positions is not None else torch.arange(len(tokens), device=tokens.device)
            seq = self._sequences.get(key)
            plan = self.policy.plan(spec, seq, tokens, pos)
            if plan.refresh or seq is None or len(seq.tokens) != len(tokens):
                seq = self._resize(seq, tokens, pos, plan.refresh)
                self._sequences[key] = seq
            plans.append((seq, tokens, pos, plan))
        limit = self.engine.signature.batch[1]
        for start in range(0, len(plans), limit):
            self._run(plans[start : start + limit])
        return [seq.logits for seq, _, _, _ in plans]

    def _resize(self, seq: _Sequence | None, tokens: torch.Tensor, pos: torch.Tensor, refresh: bool) -> _Sequence:
        """A store sized for this canvas: kept columns carry over (exact policy), the rest start empty."""
        sig = self.engine.signature
        layers, _, kv_heads, _, head_dim = _kv_spec(sig).shape
        length, device = len(tokens), tokens.device
        vocab = sig.outputs[0].shape[-1]
        new = _Sequence(
            tokens=tokens.clone(),
            positions=pos.clone(),
            keys=torch.zeros(layers, kv_heads, length, head_dim, dtype=_kv_dtype(sig), device=device),
            values=torch.zeros(layers, kv_heads, length, head_dim, dtype=_kv_dtype(sig), device=device),
            kv_tokens=torch.full((length,), -1, dtype=torch.long, device=device),
            logits=torch.zeros(length, vocab, dtype=_logits_dtype(sig), device=device),
            origin=first_mask(tokens, self.engine.spec.mask_token_id) if seq is None else seq.origin,
        )
        if seq is not None and not refresh:
            n = min(length, len(seq.tokens))
            new.keys[:, :, :n], new.values[:, :, :n] = seq.keys[:, :, :n], seq.values[:, :, :n]
            new.kv_tokens[:n], new.logits[:n] = seq.kv_tokens[:n], seq.logits[:n]
            new.block, new.since_refresh = seq.block, seq.since_refresh
        return new

    def _run(self, plans: list[tuple[_Sequence, torch.Tensor, torch.Tensor, Plan]]) -> None:
        """One step call for up to max-batch sequences, queries and keys padded to the longest."""
        sig, spec = self.engine.signature, self.engine.spec
        device = self.engine.device
        queries = [plan.query.nonzero().squeeze(1) for _, _, _, plan in plans]  # each [Q_b] int64
        keyed = [plan.keys.nonzero().squeeze(1) for _, _, _, plan in plans]  # each [C_b] int64
        q_len = max(sig.seq[0], max(len(q) for q in queries))
        c_len = max(1, max(len(k) for k in keyed))
        B = len(plans)
        pad = spec.pad_token_id if spec.pad_token_id is not None else 0
        # The stores live where the decoder's canvases do, which is the engine's device.
        input_ids = torch.full((B, q_len), pad, dtype=torch.long, device=device)  # [B, Q]
        attention_mask = torch.zeros(B, q_len, dtype=torch.bool, device=device)  # [B, Q]
        position_ids = torch.zeros(B, q_len, dtype=torch.long, device=device)  # [B, Q]
        cache_mask = torch.zeros(B, c_len, dtype=torch.bool, device=device)  # [B, C]
        cache_positions = torch.zeros(B, c_len, dtype=torch.long, device=device)  # [B, C]
        layers, _, kv_heads, _, head_dim = _kv_spec(sig).shape
        cache_keys = torch.zeros(layers, B, kv_heads, c_len, head_dim, dtype=_kv_dtype(sig), device=device)
        cache_values = torch.zeros_like(cache_keys)  # both [N, B, H, C, D]
        for b, ((seq, tokens, pos, plan), q, k) in enumerate(zip(plans, queries, keyed, strict=True)):
            input_ids[b, : len(q)] = tokens[q]
            attention_mask[b, : len(q)] = True
            position_ids[b, : len(q)] = pos[q]
            cache_mask[b, : len(k)] = True
            cache_positions[b, : len(k)] = seq.positions[k]
            cache_keys[:, b, :, : len(k)] = seq.keys[:, :, k]
            cache_values[:, b, :, : len(k)] = seq.values[:, :, k]
        inputs = (input_ids, attention_mask, position_ids, cache_mask, cache_positions, cache_keys, cache_values)
        logits, keys, values = self.engine.run_step(*inputs)
        for b, ((seq, tokens, pos, plan), q) in enumerate(zip(plans, queries, strict=True)):
            seq.tokens, seq.positions = tokens.clone(), pos.clone()
            seq.logits[q] = logits[b, : len(q)].to(seq.logits.dtype)
            seq.keys[:, :, q] = keys[:, b, :, : len(q)]
            seq.values[:, :, q] = values[:, b, :, : len(q)]
            seq.kv_tokens[q] = tokens[q]
            seq.since_refresh = 1 if plan.refresh else seq.since_refresh + 1
            if plan.refresh:
                seq.block = self.policy.block_of(tokens, spec.mask_token_id, seq.origin)


def _kv_spec(signature: StepSignature):
    for spec in signature.inputs:
        if spec.name == "cache_keys":
            return spec
    raise DlmcError("this step has no K/V cache inputs")


def _kv_dtype(signature: StepSignature) -> torch.dtype:
    return getattr(torch, _kv_spec(signature).dtype)


def _logits_dtype(signature: StepSignature) -> torch.dtype:
    return getattr(torch, signature.outputs[0].dtype)
