"""The fused loops' exact K/V cache: every active row's final K/V in one preallocated buffer.

A fused loop under `causal_cache` keeps the K/V of the columns whose K/V can no longer change (the
committed blocks of a block-causal model, the committed text of a causal one) in a buffer
[layers, A, H, W + 1, D], each row in its own logical columns, written in place as they become final
and never computed again. Column W takes the writes that are not final and is never attended to. A
row that leaves the batch gives its slot up at the next step (one copy then, none per step).
"""

from __future__ import annotations

import torch


class CommittedKV:
    """The final K/V of every active row, [layers, A, H, W + 1, D], in the row's own columns."""

    def __init__(self, sig, batch: int, width: int, device):
        spec = sig.inputs[sig.names.index("cache_keys")]
        layers, _, heads, _, dim = spec.shape
        self.keys = torch.zeros(layers, batch, heads, width + 1, dim, dtype=getattr(torch, spec.dtype), device=device)
        self.values = torch.zeros_like(self.keys)
        self.rows = torch.arange(batch, device=device)  # [A]: the row each slot holds
        self.columns = torch.arange(width + 1, device=device)  # [W + 1]
        self.width = width

    def inputs(self, active: torch.Tensor, cached: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """cache_mask, cache_positions, cache_keys, cache_values for the active rows [A] (ascending),
        whose first cached [A] columns are final."""
        if len(active) != len(self.rows):  # rows left since the last step: drop their slots once
            keep = torch.isin(self.rows, active)
            self.keys, self.values, self.rows = self.keys[:, keep], self.values[:, keep], self.rows[keep]
        cache_mask = self.columns < cached[:, None]  # [A, W + 1]
        positions = self.columns.clamp(max=self.width - 1).expand(len(active), -1)  # [A, W + 1]
        return cache_mask, positions, self.keys, self.values

    def write(self, cols: torch.Tensor, final: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the step's K/V [layers, A, H, Q, D] of the query columns cols [A, Q] where final [A, Q]."""
        index = torch.where(final, cols, self.width)[None, :, None, :, None].expand_as(keys)
        self.keys.scatter_(3, index, keys)
        self.values.scatter_(3, index, values)
