"""Mock denoisers for the decoder tests.

* `ScriptedModel`: logits are a hand-written function of each row's ids and positions, so a test can
  work out by hand what a decoder must commit; it records every call.
* `TinyDenoiser`: a small random float64 model (embedding, position embedding, one attention layer,
  linear head) that honours the spec's attention kind, the key-padding mask and the position ids, so
  a prompt's logits do not depend on the batch it is in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dlmc.spec import DenoiserSpec

VOCAB = 12
MASK = 11
EOS = 10
EOT = 9
PAD = 8


def toy_spec(**overrides) -> DenoiserSpec:
    fields = dict(
        family="toy",
        mask_token_id=MASK,
        attention="bidirectional",
        block_size=None,
        shift_logits=False,
        vocab_size=VOCAB,
        max_length=64,
        eos_token_id=EOS,
        pad_token_id=PAD,
        eot_token_id=EOT,
    )
    return DenoiserSpec(**(fields | overrides))


def peaked(token: int, p: float, vocab: int = VOCAB) -> torch.Tensor:
    """Logits [V] whose softmax puts p on `token` and spreads the rest evenly."""
    probs = torch.full((vocab,), (1 - p) / (vocab - 1), dtype=torch.float64)
    probs[token] = p
    return probs.log()


@dataclass
class Call:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None


class ScriptedModel:
    """logits[b] = fn(input_ids[b], position_ids[b]) -> [L, V]; every call is recorded."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.calls: list[Call] = []

    def __call__(self, input_ids, attention_mask, position_ids):
        self.calls.append(Call(input_ids.clone(), attention_mask, position_ids.clone()))
        return torch.stack([self.fn(ids, pos) for ids, pos in zip(input_ids, position_ids, strict=True)])


def by_position(rows: dict[int, torch.Tensor], default: torch.Tensor | None = None) -> ScriptedModel:
    """A model whose logits at logical position q are rows[q] (else `default`), whatever the input."""
    fallback = peaked(0, 0.5) if default is None else default
    return ScriptedModel(lambda ids, pos: torch.stack([rows.get(int(q), fallback) for q in pos]))


class TinyDenoiser(torch.nn.Module):
    def __init__(self, spec: DenoiserSpec, seed: int = 0, dim: int = 16, scale: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def weight(*shape: int, std: float = 1.0) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64) * std)

        self.spec = spec
        self.embed = weight(spec.vocab_size, dim)
        self.position = weight(spec.max_length, dim)
        self.wq, self.wk, self.wv = (weight(dim, dim, std=dim**-0.5) for _ in range(3))
        self.head = weight(dim, spec.vocab_size, std=scale)
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids):
        self.calls += 1
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length).expand(batch, length)
        h = self.embed[input_ids] + self.position[position_ids]  # [B, L, D]
        q, k, v = h @ self.wq, h @ self.wk, h @ self.wv
        scores = q @ k.transpose(-1, -2) / math.sqrt(h.shape[-1])  # [B, L, L]
        allowed = self._structure(position_ids, length)  # [B, L, L]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool)  # a pad query keeps one key; never read
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        logits = torch.tanh(h + attn @ v) @ self.head  # [B, L, V]
        # like a trained denoiser, never predict the mask token itself
        return logits.index_fill(-1, torch.tensor([self.spec.mask_token_id]), -1e4)

    def _structure(self, position_ids: torch.Tensor, length: int) -> torch.Tensor:
        batch = position_ids.shape[0]
        if self.spec.attention == "bidirectional":
            return torch.ones(batch, length, length, dtype=torch.bool)
        if self.spec.attention == "causal":
            return torch.ones(length, length, dtype=torch.bool).tril().expand(batch, length, length)
        block = position_ids // self.spec.block_size  # [B, L]
        return block[:, None, :] <= block[:, :, None]


PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [3, 1, 4, 1, 5, 2, 6, 5]]
"""Ragged prompts for batch-equals-single tests."""


def assert_batch_equals_single(generate, model, spec, config, seed: int = 7, prompts=PROMPTS):
    """Every row of a batched run holds exactly the tokens its prompt gets alone."""
    batched = generate(model, spec, prompts, config, seed=seed)
    for prompt, row in zip(prompts, batched.output_ids, strict=True):
        assert generate(model, spec, [prompt], config, seed=seed).output_ids[0] == row
    return batched

