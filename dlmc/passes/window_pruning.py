"""window_pruning: Window-Diffusion's windowed token pruning, on top of the dual cache (approximate).

Masks far to the right of the block being decoded barely influence it, yet every step of a plain
decoder computes them. Here each step computes the block's rows only (as the dual cache does), attends
to the decoded prefix and the first `window` masks after the block from the cache, and prunes every
mask beyond that window entirely, including from the full step at each block start (the phase refresh),
which therefore costs prefix + block + window rows instead of the whole canvas. `refresh` adds a phase
refresh every that many steps within a block.

The paper slides an active set over the leftmost masks without blocks; here the LLaDA decoder's block
plays the active set, so the decoder must use the same block_length (the runtime checks). It may be
followed by `fuse_decode`: the fused llada loop runs it (`dlmc.runtime.fused_step.WindowCache`), with
the block length the run's setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmc.capture import StepProgram
from dlmc.passes import PassConfig, PassResult, register
from dlmc.passes.kv_cache import add_kv_cache, require_bidirectional
from dlmc.runtime.policies import CachePolicy, Window


@dataclass(frozen=True, kw_only=True)
class WindowPruning(PassConfig):
    """Compute the block, keep `window` masks after it as context, prune the rest."""

    name: ClassVar[str] = "window_pruning"
    exact: ClassVar[bool] = False
    kv_cache: ClassVar[bool] = True
    window: int = 32
    """Masks after the block kept as (cached) context; the masks beyond are pruned."""
    block_length: int = 32
    """The decoder's block length: the active rows of each step."""
    refresh: int | None = None
    """A phase refresh every this many steps within a block; None: only at block starts."""

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError("window: must be >= 0")
        if self.block_length < 1:
            raise ValueError("block_length: must be >= 1")
        if self.refresh is not None and self.refresh < 1:
            raise ValueError("refresh: must be >= 1 (or null for block starts only)")

    def policy(self) -> CachePolicy:
        return Window(window=self.window, block_length=self.block_length, refresh=self.refresh)


@register(WindowPruning)
def window_pruning(program: StepProgram, config: WindowPruning) -> PassResult:
    require_bidirectional(program, config.name)
    return PassResult(add_kv_cache(program, config.policy().to_dict()), True)
