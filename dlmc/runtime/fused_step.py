"""The fused LLaDA step over the rows of a `Rows` canvas: uncached, with Fast-dLLM v1's dual or prefix
cache, or with Window-Diffusion's pruning (window) on the dual cache. Each calls the compiled step
through `run` (`dlmc.runtime.cuda_graph.step_runner`: replayed as CUDA graphs on CUDA,
`engine.run_step` elsewhere).

Each is called with every row's block (`Blocks`: its first column, on device and on the host), the
columns [B, K] the decoding rule reads and the rows' draws, and hand back the step's first `outputs`
per-row results (tokens, confidence, confidence64, then any extras a strategy reads) [B, K]. Rows
join and leave between calls (`dlmc.runtime.loop.Decoding`): a cache's per-row buffers follow the
canvas through `append` and `keep`.

None of them reads a device value back: which rows run a full step and the widths of a step's inputs
come from host ints (the loop's schedule, and the blocks each buffer holds), so a step queues its
kernels without waiting for the ones before it (and replays as a CUDA graph, `cuda_graph`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmc.runtime.cache import empty_cache
from dlmc.runtime.canvas import Rows, upload
from dlmc.runtime.policies import CachePolicy, Window


@dataclass(frozen=True)
class Blocks:
    """Each row's current block: its first column on device (the step's inputs) and, with the block's
    index, as host ints (which rows run a full step, how wide the step's inputs are)."""

    lo: torch.Tensor  # [B] int64: each row's first block column
    host_lo: list[int]  # the same, on the host
    index: list[int]  # which block of its generation each row is in

    def pick(self, rows: list[int]) -> tuple[torch.Tensor, Blocks]:
        """Some rows: their indices on device [n], and their blocks."""
        picked = upload(rows, self.lo.device)  # [n]
        return picked, Blocks(self.lo[picked], [self.host_lo[b] for b in rows], [self.index[b] for b in rows])


class Uncached:
    """The step over every column of every row's canvas; the head on the block's rows."""

    def __init__(self, run, rows: Rows, shift: int, outputs: int):
        self.run, self.rows, self.shift, self.outputs = run, rows, shift, outputs

    def __call__(self, blocks: Blocks, columns: torch.Tensor, draws: tuple[torch.Tensor, ...]):
        head_rows = (columns - self.shift).clamp(min=0)  # [B, K]: the rows predicting the columns
        r = self.rows
        return self.run(r.x, r.real, r.positions, head_rows, *draws)[: self.outputs]

    def append(self, count: int, grown: int) -> None:
        """`count` rows joined; every older row was padded by `grown` columns on the left."""

    def keep(self, kept: list[int], cut: int) -> None:
        """Only the rows `kept` (their indices) stay; `cut` leading columns were dropped."""


class BlockCache:
    """Per row: a buffer of K/V slots from the row's last full step, for the block's other steps.

    A row's step at the start of its block (or every `refresh` steps) runs its whole canvas and keeps the
    K/V of the columns its policy caches; its block's other steps (`_cached`, the policy's) compute fewer
    rows against that buffer. A row that joins has no buffer yet, so its first step is a full one,
    whatever the others do: joining at any step is exact. The buffer's slots are canvas columns in order,
    so left padding (a wider row joining) adds slots at the front and cutting padding drops them there."""

    def __init__(self, run, signature, rows: Rows, block_length: int, shift: int, policy: CachePolicy, outputs: int):
        """`policy`: the artifact's (`signature.cache`), for its settings; the block length is the run's."""
        self.run, self.signature, self.rows, self.outputs = run, signature, rows, outputs
        self.refresh = policy.refresh
        self.block_length, self.shift = block_length, shift
        # host ints, so that choosing the rows of a full step reads nothing back from the device
        self.held: list[int] = []  # per row: the block its buffer holds, -1 none
        self.since: list[int] = []  # per row: steps since its last full step
        self.keys: torch.Tensor | None = None  # [layers, B, kv_heads, S, head_dim], allocated at the first step
        self.values: torch.Tensor | None = None

    def slots(self, width: int) -> int:
        """How many K/V slots a row's buffer holds on a canvas this wide."""
        raise NotImplementedError

    def append(self, count: int, grown: int) -> None:
        """`count` rows joined (nothing cached for them); every older row was padded by `grown` columns
        on the left, which adds that many (masked) slots at the front of its buffer."""
        old = len(self.held)
        if not old:  # the first rows, or the first since every row left: buffers sized to the new canvas
            self.keys = self.values = None
        self.held, self.since = self.held + [-1] * count, self.since + [0] * count
        if self.keys is None:
            return
        layers, _, heads, _, dim = self.keys.shape
        if grown:
            zeros = self.keys.new_zeros(layers, old, heads, grown, dim)
            self.keys, self.values = torch.cat([zeros, self.keys], 3), torch.cat([zeros, self.values], 3)
        zeros = self.keys.new_zeros(layers, count, heads, self.slots(self.rows.width), dim)
        self.keys, self.values = torch.cat([self.keys, zeros], 1), torch.cat([self.values, zeros], 1)

    def keep(self, kept: list[int], cut: int) -> None:
        """Only the rows `kept` (their indices) stay; `cut` leading columns (padding in every kept row,
        so never one a buffer holds a real K/V for) were dropped."""
        self.held, self.since = [self.held[b] for b in kept], [self.since[b] for b in kept]
        if self.keys is not None:
            rows = upload(kept, self.keys.device)  # [n]
            self.keys, self.values = self.keys[:, rows, :, cut:], self.values[:, rows, :, cut:]

    def __call__(self, blocks: Blocks, columns: torch.Tensor, draws: tuple[torch.Tensor, ...]):
        """`columns` are the blocks' (a cached step computes no others: strategies reading more are refused)."""
        # a new block (or a refresh) needs the whole canvas
        stale = [held != index or (self.refresh is not None and since >= self.refresh)
                 for held, since, index in zip(self.held, self.since, blocks.index, strict=True)]
        if all(stale):
            every = torch.arange(len(stale), device=blocks.lo.device)  # [B]
            out = self._full(every, list(range(len(stale))), blocks, draws)
        elif not any(stale):
            out = self._cached(None, blocks, draws)
        else:  # rows at different points of their blocks: one call for each kind
            full, cached = [b for b, s in enumerate(stale) if s], [b for b, s in enumerate(stale) if not s]
            (full_rows, full_blocks), (cached_rows, cached_blocks) = blocks.pick(full), blocks.pick(cached)
            a = self._full(full_rows, full, full_blocks, _rows(draws, full_rows))
            b = self._cached(cached_rows, cached_blocks, _rows(draws, cached_rows))
            order = upload(sorted(range(len(stale)), key=(full + cached).__getitem__), blocks.lo.device)  # [B]
            out = tuple(torch.cat([x, y])[order] for x, y in zip(a, b))
        self.since = [s + 1 for s in self.since]
        return out

    def _full(self, rows: torch.Tensor, host_rows: list[int], blocks: Blocks, draws):
        """The whole canvas of the rows [n] (`host_rows` on the host), nothing cached; the buffer keeps
        what the policy caches (`_kept`)."""
        first = blocks.lo - self.shift  # [n]: first row computed (for shifted logits the one before the block)
        head_rows = first[:, None] + torch.arange(self.block_length, device=first.device)  # [n, bl]
        inputs = (*self._canvas(rows, blocks), *empty_cache(self.signature, len(rows), self.rows.device))
        *decoded, keys, values = self.run(*inputs, head_rows, *draws)  # keys, values: [layers, n, H, L, D]
        keys, values = self._kept(rows, first, keys, values)  # [layers, n, H, S, D]
        r = self.rows
        if self.keys is None:
            layers, _, heads, slots, dim = keys.shape
            self.keys = keys.new_zeros(layers, len(r), heads, slots, dim)
            self.values = torch.zeros_like(self.keys)
        self.keys[:, rows], self.values[:, rows] = keys, values
        for b, index in zip(host_rows, blocks.index, strict=True):
            self.held[b], self.since[b] = index, 0
        return tuple(decoded)

    def _canvas(self, rows: torch.Tensor, blocks: Blocks) -> tuple[torch.Tensor, ...]:
        """A full step's tokens, key mask and positions [n, L]: every column of the rows' canvases."""
        return self.rows.x[rows], self.rows.real[rows], self.rows.positions[rows]

    def _kept(self, rows: torch.Tensor, first: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """The slots a full step of these rows fills, from its K/V of every column [layers, n, H, L, D]."""
        raise NotImplementedError

    def _cached(self, rows: torch.Tensor | None, blocks: Blocks, draws):
        """A step inside the block against the buffer (rows None: every row)."""
        raise NotImplementedError


class DualCache(BlockCache):
    """Fast-dLLM v1's dual cache: the buffer holds every column outside the block's span (the prefix and
    the masked suffix); a cached step computes only the span's rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.span = self.block_length + self.shift  # rows computed: the block's, and for shifted logits the one before
        self.index = torch.empty(0, 0, dtype=torch.long, device=self.rows.device)  # [B, S]: each slot's column

    def slots(self, width: int) -> int:
        return width - self.span

    def append(self, count: int, grown: int) -> None:
        """As BlockCache; the slots' columns move right by `grown`, the new leading slots are padding."""
        device, old = self.index.device, len(self.held)
        if grown and old:
            pads = torch.arange(grown, device=device).expand(old, -1)  # [B, grown]
            self.index = torch.cat([pads, self.index + grown], 1)  # [B, S + grown]
        slots = self.slots(self.rows.width)
        fresh = torch.arange(slots, device=device).expand(count, -1)  # [n, S]: replaced by its first step
        self.index = torch.cat([self.index.reshape(old, slots), fresh])
        super().append(count, grown)

    def keep(self, kept: list[int], cut: int) -> None:
        self.index = self.index[upload(kept, self.index.device), cut:] - cut
        super().keep(kept, cut)

    def _kept(self, rows, first, keys, values):
        columns = torch.arange(self.index.shape[1], device=first.device)  # [S]
        index = columns + (columns >= first[:, None]) * self.span  # [n, S]: every column but the span's
        layers, _, heads, computed, dim = keys.shape
        # a full step that computed fewer columns (window pruning) leaves the slots past them masked out
        within = index.clamp(max=computed - 1)  # [n, S]
        gather = within[None, :, None, :, None].expand(layers, -1, heads, -1, dim)  # [layers, n, H, S, D]
        self.index[rows] = index
        return keys.gather(3, gather), values.gather(3, gather)

    def _cached(self, rows, blocks, draws):
        """Only the span's rows, attending to the buffer."""
        r, first = self.rows, blocks.lo - self.shift  # first: [n]
        span = first[:, None] + torch.arange(self.span, device=first.device)  # [n, span]
        head_rows = torch.arange(self.block_length, device=first.device).expand(len(first), -1)  # [n, bl]
        if rows is None:  # the buffers as they are (indexing would copy the whole cache every step)
            x, real, positions, index, keys, values = r.x, r.real, r.positions, self.index, self.keys, self.values
        else:
            x, real, positions, index = r.x[rows], r.real[rows], r.positions[rows], self.index[rows]
            keys, values = self.keys[:, rows], self.values[:, rows]
        index, keys, values, cached = self._read(blocks, first, real, index, keys, values)
        inputs = (x.gather(1, span), real.gather(1, span), positions.gather(1, span),
                  cached, positions.gather(1, index), keys, values)
        return self.run(*inputs, head_rows, *draws)[: self.outputs]

    def _read(self, blocks, first, real, index, keys, values):
        """The slots a cached step attends to: index [n, S], keys and values, and which are real [n, S]."""
        return index, keys, values, real.gather(1, index)


class WindowCache(DualCache):
    """Window-Diffusion's pruning on the dual cache: a row sees its prefix, its block and the first
    `window` columns after the block (all masks: the llada decoder commits inside its block only); the
    masks beyond are pruned from every step, the full one included, which runs the canvas only up to
    the widest row's window."""

    def __init__(self, run, signature, rows: Rows, block_length: int, shift: int, policy: Window, outputs: int):
        super().__init__(run, signature, rows, block_length, shift, policy, outputs)
        self.window = policy.window

    def _canvas(self, rows, blocks):
        r, first = self.rows, blocks.lo - self.shift  # first: [n]
        seen = first + self.span + self.window  # [n]: each row's first pruned column
        width = min(r.width, max(blocks.host_lo) - self.shift + self.span + self.window)  # the widest row's
        real = r.real[rows, :width] & (torch.arange(width, device=first.device) < seen[:, None])  # [n, W]
        return r.x[rows, :width], real, r.positions[rows, :width]

    def _read(self, blocks, first, real, index, keys, values):
        # slot s holds column s before the block, s + span after it: the slots before first + window are seen
        slots = min(index.shape[1], max(1, max(blocks.host_lo) - self.shift + self.window))  # the step's cache width
        index, keys, values = index[:, :slots], keys[:, :, :, :slots], values[:, :, :, :slots]
        seen = real.gather(1, index) & (index < (first + self.span + self.window)[:, None])  # [n, slots]
        return index, keys, values, seen


class PrefixCache(BlockCache):
    """Fast-dLLM v1's prefix cache: slot s holds column s's K/V from the full step; a cached step computes
    the block and every column after it, attending to the buffer's columns before the block.

    Rows end at the same column (right-aligned), so the computed rows are the canvas's last Q columns,
    Q = the longest row's block-and-after; a row's columns there before its own block are masked out of
    the queries and read from its buffer instead, as its columns before the block are."""

    def slots(self, width: int) -> int:
        return width

    def _kept(self, rows, first, keys, values):
        return keys, values  # every column: a cached step reads the ones before its block

    def _cached(self, rows, blocks, draws):
        r, first = self.rows, blocks.lo - self.shift  # first: [n]
        low, high = min(blocks.host_lo) - self.shift, max(blocks.host_lo) - self.shift  # the step's shapes
        high = max(high, 1)  # the cache inputs are never empty (a row at column 0 masks its one slot)
        if rows is None:
            x, real, positions, keys, values = r.x, r.real, r.positions, self.keys, self.values
        else:
            x, real, positions = r.x[rows], r.real[rows], r.positions[rows]
            keys, values = self.keys[:, rows], self.values[:, rows]
        computed = torch.arange(low, r.width, device=first.device)  # [Q]: the columns computed
        query_real = real[:, low:] & (computed >= first[:, None])  # [n, Q]: not padding, not in the row's prefix
        cached = real[:, :high] & (torch.arange(high, device=first.device) < first[:, None])  # [n, C]
        head_rows = (first - low)[:, None] + torch.arange(self.block_length, device=first.device)  # [n, bl]
        inputs = (x[:, low:], query_real, positions[:, low:], cached, positions[:, :high],
                  keys[:, :, :, :high], values[:, :, :, :high])
        return self.run(*inputs, head_rows, *draws)[: self.outputs]


CACHED_STEPS: dict[str, type[BlockCache]] = {"dual": DualCache, "prefix": PrefixCache, "window": WindowCache}
"""Closed registry: the cache policy a step signature records -> the fused loop's step under it."""


def _rows(draws: tuple[torch.Tensor, ...], rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The draws of some rows: the uniforms [B, bl, V] are per row, the temperature [1] is shared."""
    return tuple(d[rows] if d.dim() == 3 else d for d in draws)
