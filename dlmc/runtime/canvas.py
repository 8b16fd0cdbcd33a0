"""Canvases of the fused loops: every row's [prompt | generation region] in one left-padded [B, L] tensor.

Left padding never moves a token: each row carries logical positions (padding masked out of attention),
so a row decodes what it decodes alone, up to rounding. `Batch` is a fixed batch (the Dream loop);
`Rows` is a batch that rows join and leave between steps (the LLaDA loop, `dlmc serve`): the rows are
right-aligned, so a joining row with a longer canvas pads every row on the left, and when the longest
rows leave, the columns only padding fills are cut again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """The canvas of every row, left-padded: prompt, then gen_length masks."""

    x: torch.Tensor  # [B, L] int64
    real: torch.Tensor  # [B, L] bool: not padding
    positions: torch.Tensor  # [B, L] int64: logical positions (padding does not move a token)
    lengths: list[int]  # each row's unpadded canvas length, for its random draws
    start: int  # first generated column (the same for every row)


def canvas(prompts: list[list[int]], mask_id: int, pad_id: int, gen_length: int, device) -> Batch:
    longest = max(len(p) for p in prompts)
    L = longest + gen_length
    x = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)  # [B, L]
    real = torch.zeros(len(prompts), L, dtype=torch.bool, device=device)  # [B, L]
    for b, prompt in enumerate(prompts):
        x[b, longest - len(prompt) : longest] = torch.tensor(prompt, dtype=torch.long, device=device)
        real[b, longest - len(prompt) :] = True
    x[:, longest:] = mask_id
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    return Batch(x, real, positions, [len(p) + gen_length for p in prompts], longest)


class Rows:
    """Rows of different prompt and generation lengths, right-aligned: row b's canvas is the last
    `lengths[b]` columns, its generation region the last `gen[b]`."""

    def __init__(self, mask_id: int, pad_id: int, device: torch.device):
        self.mask_id, self.pad_id, self.device = mask_id, pad_id, device
        self.x = torch.empty(0, 0, dtype=torch.long, device=device)  # [B, L] int64
        self.real = torch.empty(0, 0, dtype=torch.bool, device=device)  # [B, L] bool: not padding
        self.positions = torch.empty(0, 0, dtype=torch.long, device=device)  # [B, L] int64
        self.gen = torch.empty(0, dtype=torch.long, device=device)  # [B]: generation lengths
        self.lengths: list[int] = []  # each row's unpadded canvas length, for its random draws

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    @property
    def start(self) -> torch.Tensor:
        """[B]: each row's first generated column."""
        return self.width - self.gen

    def append(self, prompts: list[list[int]], gen_lengths: list[int]) -> int:
        """Add rows (prompt, then masks) at the end; returns how many columns every old row was padded by."""
        lengths = [len(p) + g for p, g in zip(prompts, gen_lengths, strict=True)]
        width = max(self.width, *lengths)
        grown = width - self.width
        if grown:
            self._pad_left(grown)
        x = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)  # [n, L]
        real = torch.zeros(len(prompts), width, dtype=torch.bool, device=self.device)  # [n, L]
        for b, (prompt, gen) in enumerate(zip(prompts, gen_lengths)):
            x[b, width - gen - len(prompt) : width - gen] = torch.tensor(prompt, dtype=torch.long, device=self.device)
            x[b, width - gen :] = self.mask_id
            real[b, width - gen - len(prompt) :] = True
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # [n, L]
        self.x, self.real = torch.cat([self.x, x]), torch.cat([self.real, real])
        self.positions = torch.cat([self.positions, positions])
        self.gen = torch.cat([self.gen, torch.tensor(gen_lengths, dtype=torch.long, device=self.device)])
        self.lengths += lengths
        return grown

    def keep(self, keep: list[bool]) -> int:
        """Keep the rows marked True; returns how many leading columns (padding in every kept row) were cut."""
        rows = upload([b for b, k in enumerate(keep) if k], self.device)  # [n]: indices, not a mask (no sync)
        self.lengths = [n for n, k in zip(self.lengths, keep, strict=True) if k]
        cut = self.width - max(self.lengths, default=0)
        self.x, self.real = self.x[rows, cut:], self.real[rows, cut:]
        self.positions, self.gen = self.positions[rows, cut:], self.gen[rows]
        return cut

    def _pad_left(self, columns: int) -> None:
        B = len(self)
        self.x = torch.cat([self.x.new_full((B, columns), self.pad_id), self.x], 1)  # [B, L + columns]
        self.real = torch.cat([self.real.new_zeros(B, columns), self.real], 1)
        self.positions = torch.cat([self.positions.new_zeros(B, columns), self.positions], 1)


def upload(values: list[int], device) -> torch.Tensor:
    """Host ints as an int64 tensor [n] on `device`. On CUDA the copy goes through pinned memory and
    is queued behind the running kernels: a plain copy from pageable memory waits for them (a sync)."""
    host = torch.tensor(values, dtype=torch.long)  # [n]
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
