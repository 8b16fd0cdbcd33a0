"""delayed_kv: dKV-Cache's decode and prefill caches for bidirectional models (approximate).

A token's K/V change most at the step it is decoded (its input flips from the mask to the token) and
little afterwards, so they are cached one step late: a column is computed at the step after it was
decoded, with its token, and reused from then on. Masks are always recomputed. A full step every
`refresh` steps (the paper uses 8 for LLaDA) and, with `block_length`, at every block start (as the
official code resets its cache per block). For shifted-logit models (Dream) the row before every
recomputed column is recomputed too, since it predicts that column.

`mode: prefill` is dKV-Cache's prefill cache instead: the prompt's K/V, computed at the first step and
reused for the whole generation (refreshed only if `refresh` is set); the generation region is computed
every step. dKV-Cache-Greedy is not offered: it needs the decode order in advance (random remasking
with a fixed permutation), which the reference decoders do not expose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from dlmc.capture import StepProgram
from dlmc.passes import PassConfig, PassResult, register
from dlmc.passes.kv_cache import add_kv_cache, require_bidirectional
from dlmc.runtime.policies import CachePolicy, Delayed, Prefill


@dataclass(frozen=True, kw_only=True)
class DelayedKV(PassConfig):
    """Cache decoded tokens' K/V one step after decoding; refresh every `refresh` steps."""

    name: ClassVar[str] = "delayed_kv"
    exact: ClassVar[bool] = False
    kv_cache: ClassVar[bool] = True
    mode: Literal["decode", "prefill"] = "decode"
    """decode: decoded tokens' K/V one step late; prefill: the prompt's K/V only."""
    refresh: int | None = 8
    """A full step every this many steps; None: never (after the first)."""
    block_length: int | None = None
    """Also a full step at each block start of a semi-autoregressive decoder with this block length."""

    def __post_init__(self) -> None:
        if self.refresh is not None and self.refresh < 1:
            raise ValueError("refresh: must be >= 1 (or null for never)")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError("block_length: must be >= 1")


    def policy(self) -> CachePolicy:
        kind = Delayed if self.mode == "decode" else Prefill
        return kind(refresh=self.refresh, block_length=self.block_length)


@register(DelayedKV)
def delayed_kv(program: StepProgram, config: DelayedKV) -> PassResult:
    require_bidirectional(program, config.name)
    return PassResult(add_kv_cache(program, config.policy().to_dict()), True)
