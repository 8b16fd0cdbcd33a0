"""block_cache: Fast-dLLM v1's prefix and dual caches for bidirectional models (approximate).

At the first step of each semi-autoregressive block the whole canvas is computed and its K/V stored.
For the rest of the block only the block's rows are computed (`dual`), or the block and the masked
suffix after it (`prefix`); the other K/V are reused although the block's new tokens would have changed
them slightly. `refresh` adds a full step every that many steps within a block. The decoder must be the
LLaDA decoder with the same block_length (the runtime checks). Either mode may be followed by
`fuse_decode`: the fused llada loop runs both (`dlmc.runtime.fused_step`), and there the block length
is the run's setting, not held to this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from dlmc.capture import StepProgram
from dlmc.passes import PassConfig, PassResult, register
from dlmc.passes.kv_cache import add_kv_cache, require_bidirectional
from dlmc.runtime.policies import POLICIES, CachePolicy


@dataclass(frozen=True, kw_only=True)
class BlockCache(PassConfig):
    """Freeze the K/V outside the current block for the block's steps."""

    name: ClassVar[str] = "block_cache"
    exact: ClassVar[bool] = False
    kv_cache: ClassVar[bool] = True
    mode: Literal["prefix", "dual"] = "dual"
    """prefix: recompute the block and everything after it; dual: recompute the block only."""
    block_length: int = 32
    """The decoder's block length (the LLaDA decoder's block_length)."""
    refresh: int | None = None
    """A full step every this many steps within a block; None: only at block starts."""

    def __post_init__(self) -> None:
        if self.block_length < 1:
            raise ValueError("block_length: must be >= 1")
        if self.refresh is not None and self.refresh < 1:
            raise ValueError("refresh: must be >= 1 (or null for block starts only)")


    def policy(self) -> CachePolicy:
        return POLICIES[self.mode](block_length=self.block_length, refresh=self.refresh)


@register(BlockCache)
def block_cache(program: StepProgram, config: BlockCache) -> PassResult:
    require_bidirectional(program, config.name)
    return PassResult(add_kv_cache(program, config.policy().to_dict()), True)
