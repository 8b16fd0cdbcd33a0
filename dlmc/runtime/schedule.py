"""The fused LLaDA loop's schedule on the host: each row's place in its decode (its block, its step in
the block, its steps so far) as plain ints, kept by the same rules as the loop's device counters.

The loop decides by it whatever needs a host value (which rows take a full step under a cache, how
wide a step's inputs are, when a row has finished) so that a step reads nothing back from the device:
under LLaDA's schedule every one of those is known from the counts alone (`dlmc.runtime.loop`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from dlmc.decoding.llada import LLaDAConfig


@dataclass
class Schedule:
    """Per row: where it is in its decode, as host ints, and the settings that move it on.
    The device keeps the same counters (`Decoding.block`, `steps_in_block`) for the step's inputs."""

    block: list[int]  # per row: its current block
    step: list[int]  # steps taken inside it
    nfe: list[int]  # steps taken since the row joined
    num_blocks: list[int]
    steps_per_block: list[int]
    gen: list[int]  # generation length
    stop_at_eos: list[bool]

    @classmethod
    def of(cls, configs: list[LLaDAConfig]) -> Schedule:
        """Rows that have not stepped yet."""
        n = len(configs)
        return cls([0] * n, [0] * n, [0] * n, [c.num_blocks for c in configs], [c.steps_per_block for c in configs],
                   [c.gen_length for c in configs], [c.stop_at_eos for c in configs])

    def __add__(self, other: Schedule) -> Schedule:
        return Schedule(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def keep(self, keep: list[bool]) -> Schedule:
        return Schedule(*([v for v, k in zip(getattr(self, f.name), keep) if k] for f in fields(self)))

    def lo(self, width: int, block_length: int) -> list[int]:
        """Each row's first block column on a right-aligned canvas this wide."""
        return [width - g + b * block_length for g, b in zip(self.gen, self.block)]

    def ends(self) -> list[bool]:
        """Whether this step is the last of each row's block under LLaDA's schedule."""
        return [s + 1 == n for s, n in zip(self.step, self.steps_per_block)]

    def advance(self, ended: list[bool]) -> list[bool]:
        """Every row took a step; `ended` says whose block it filled. -> whose last block that was"""
        self.nfe = [n + 1 for n in self.nfe]
        self.step = [0 if e else s + 1 for s, e in zip(self.step, ended)]
        self.block = [b + e for b, e in zip(self.block, ended)]
        return [b == n for b, n in zip(self.block, self.num_blocks)]
