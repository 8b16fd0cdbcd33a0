"""The fused LLaDA step over the rows of a `Rows` canvas, uncached or with Fast-dLLM v1's dual cache.
Both call the compiled step through `run` (`dlmc.runtime.cuda_graph.step_runner`: replayed as CUDA
graphs on CUDA, `engine.run_step` elsewhere).

Both are called with every row's block (its first column `lo` [B] and its index `block` [B]), the
columns [B, K] the decoding rule reads and the rows' draws, and hand back the step's first `outputs`
per-row results (tokens, confidence, confidence64, then any extras a strategy reads) [B, K]. Rows
join and leave between calls (`dlmc.runtime.loop.Decoding`): the dual cache's per-row buffers follow
the canvas through `grow`, `append` and `keep`.
"""

from __future__ import annotations

import torch

from dlmc.runtime.cache import empty_cache
from dlmc.runtime.canvas import Rows


class Uncached:
    """The step over every column of every row's canvas; the head on the block's rows."""

    def __init__(self, run, rows: Rows, shift: int, outputs: int):
        self.run, self.rows, self.shift, self.outputs = run, rows, shift, outputs

    def __call__(self, lo: torch.Tensor, block: torch.Tensor, columns: torch.Tensor, draws: tuple[torch.Tensor, ...]):
        head_rows = (columns - self.shift).clamp(min=0)  # [B, K]: the rows predicting the columns
        r = self.rows
        return self.run(r.x, r.real, r.positions, head_rows, *draws)[: self.outputs]

    def append(self, count: int, grown: int) -> None:
        """`count` rows joined; every older row was padded by `grown` columns on the left."""

    def keep(self, keep: torch.Tensor, cut: int) -> None:
        """Only the rows marked in keep [B] stay; `cut` leading columns were dropped."""


class DualCache:
    """Per row: the K/V of every column outside its block's span, from the row's last full step.

    A row's step at the start of its block (or every `refresh` steps) runs its whole canvas and keeps the
    K/V of every column outside the block; its block's other steps run only the block's rows against that
    buffer. A row that joins has no buffer yet, so its first step is a full one, whatever the others do:
    joining at any step is exact."""

    def __init__(self, run, signature, rows: Rows, block_length: int, shift: int, refresh: int | None, outputs: int):
        self.run, self.signature, self.rows, self.refresh, self.outputs = run, signature, rows, refresh, outputs
        self.block_length, self.shift = block_length, shift
        self.span = block_length + shift  # rows computed: the block's, and for shifted logits the one before
        device = rows.device
        self.block = torch.empty(0, dtype=torch.long, device=device)  # [B]: block the buffer holds, -1 none
        self.since = torch.empty(0, dtype=torch.long, device=device)  # [B]: steps since the last full step
        self.index = torch.empty(0, 0, dtype=torch.long, device=device)  # [B, C]: cached columns, C = L - span
        self.keys: torch.Tensor | None = None  # [layers, B, kv_heads, C, head_dim], allocated at the first step
        self.values: torch.Tensor | None = None

    def append(self, count: int, grown: int) -> None:
        """`count` rows joined (nothing cached for them); every older row was padded by `grown` columns
        on the left, which shifts the columns its buffer holds and adds that many (masked) ones."""
        device, old = self.index.device, len(self.block)
        columns = self.rows.width - self.span
        if not old:  # the first rows, or the first since every row left: buffers sized to the new canvas
            self.keys = self.values = None
        if grown and old:
            pads = torch.arange(grown, device=device).expand(old, -1)  # [B, grown]
            self.index = torch.cat([pads, self.index + grown], 1)  # [B, C + grown]
            if self.keys is not None:
                layers, _, heads, _, dim = self.keys.shape
                zeros = self.keys.new_zeros(layers, old, heads, grown, dim)
                self.keys, self.values = torch.cat([zeros, self.keys], 3), torch.cat([zeros, self.values], 3)
        fresh = torch.arange(columns, device=device).expand(count, -1)  # [n, C]: replaced by its first step
        self.index = torch.cat([self.index.reshape(old, columns), fresh])
        self.block = torch.cat([self.block, torch.full((count,), -1, dtype=torch.long, device=device)])
        self.since = torch.cat([self.since, torch.zeros(count, dtype=torch.long, device=device)])
        if self.keys is not None:
            layers, _, heads, _, dim = self.keys.shape
            zeros = self.keys.new_zeros(layers, count, heads, columns, dim)
            self.keys, self.values = torch.cat([self.keys, zeros], 1), torch.cat([self.values, zeros], 1)

    def keep(self, keep: torch.Tensor, cut: int) -> None:
        """Only the rows marked in keep [B] stay; `cut` leading columns (padding in every kept row, so
        never one a buffer holds a real K/V for) were dropped."""
        self.block, self.since = self.block[keep], self.since[keep]
        self.index = self.index[keep, cut:] - cut
        if self.keys is not None:
            self.keys, self.values = self.keys[:, keep, :, cut:], self.values[:, keep, :, cut:]

    def __call__(self, lo: torch.Tensor, block: torch.Tensor, columns: torch.Tensor, draws: tuple[torch.Tensor, ...]):
        """`columns` are the blocks' (a cached step computes no others: strategies reading more are refused)."""
        stale = self.block != block  # [B]: a new block (or a refresh) needs the whole canvas
        if self.refresh is not None:
            stale |= self.since >= self.refresh
        first = lo - self.shift  # [B]: first row computed
        if bool(stale.all()):
            out = self._full(torch.arange(len(lo), device=lo.device), first, block, draws)
        elif not bool(stale.any()):
            out = self._cached(None, first, draws)
        else:  # rows at different points of their blocks: one call for each kind
            full, cached = stale.nonzero().squeeze(1), (~stale).nonzero().squeeze(1)  # [F], [C]
            a = self._full(full, first[full], block[full], _rows(draws, full))
            b = self._cached(cached, first[cached], _rows(draws, cached))
            out = tuple(torch.cat([x, y])[torch.cat([full, cached]).argsort()] for x, y in zip(a, b))
        self.since += 1
        return out

    def _full(self, rows: torch.Tensor, first: torch.Tensor, block: torch.Tensor, draws):
        """The whole canvas, nothing cached; keep the K/V of every column outside the block's span."""
        r = self.rows
        head_rows = first[:, None] + torch.arange(self.block_length, device=first.device)  # [n, bl]
        inputs = (r.x[rows], r.real[rows], r.positions[rows], *empty_cache(self.signature, len(rows), r.device))
        *decoded, keys, values = self.run(*inputs, head_rows, *draws)
        columns = torch.arange(self.index.shape[1], device=first.device)  # [C]
        index = columns + (columns >= first[:, None]) * self.span  # [n, C]: every column but the span's
        layers, _, heads, _, dim = keys.shape
        if self.keys is None:
            self.keys = keys.new_zeros(layers, len(r), heads, len(columns), dim)
            self.values = torch.zeros_like(self.keys)
        gather = index[None, :, None, :, None].expand(layers, -1, heads, -1, dim)  # [layers, n, H, C, D]
        self.keys[:, rows] = keys.gather(3, gather)
        self.values[:, rows] = values.gather(3, gather)
        self.index[rows], self.block[rows], self.since[rows] = index, block, 0
        return tuple(decoded)

    def _cached(self, rows: torch.Tensor | None, first: torch.Tensor, draws):
        """Only the span's rows, attending to the buffer (rows None: every row)."""
        r = self.rows
        span = first[:, None] + torch.arange(self.span, device=first.device)  # [n, span]
        head_rows = torch.arange(self.block_length, device=first.device).expand(len(first), -1)  # [n, bl]
        if rows is None:  # the buffers as they are (indexing would copy the whole cache every step)
            x, real, positions, index, keys, values = r.x, r.real, r.positions, self.index, self.keys, self.values
        else:
            x, real, positions, index = r.x[rows], r.real[rows], r.positions[rows], self.index[rows]
            keys, values = self.keys[:, rows], self.values[:, rows]
        inputs = (x.gather(1, span), real.gather(1, span), positions.gather(1, span),
                  real.gather(1, index), positions.gather(1, index), keys, values)
        return self.run(*inputs, head_rows, *draws)[: self.outputs]


def _rows(draws: tuple[torch.Tensor, ...], rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The draws of some rows: the uniforms [B, bl, V] are per row, the temperature [1] is shared."""
    return tuple(d[rows] if d.dim() == 3 else d for d in draws)
