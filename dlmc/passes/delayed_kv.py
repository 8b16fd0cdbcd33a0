"""delayed_kv: dKV-Cache-Decode for bidirectional models (approximate).

A token's K/V change most at the step it is decoded (its input flips from the mask to the token) and
little afterwards, so they are cached one step late: a column is computed at the step after it was
decoded, with its token, and reused from then on. Masks are always recomputed. A full step every
`refresh` steps (the paper uses 8 for LLaDA) and, with `block_length`, at every block start (as the
official code resets its cache per block). For shifted-logit models (Dream) the row before every
recomputed column is recomputed too, since it predicts that column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmc.capture import StepProgram
from dlmc.passes import PassConfig, PassResult, register
from dlmc.passes.kv_cache import add_kv_cache, require_bidirectional


@dataclass(frozen=True, kw_only=True)
class DelayedKV(PassConfig):
    """Cache decoded tokens' K/V one step after decoding; refresh every `refresh` steps."""

    name: ClassVar[str] = "delayed_kv"
    exact: ClassVar[bool] = False
    kv_cache: ClassVar[bool] = True
    refresh: int = 8
    """A full step every this many steps."""
    block_length: int | None = None
    """Also a full step at each block start of a semi-autoregressive decoder with this block length."""

    def __post_init__(self) -> None:
        if self.refresh < 1:
            raise ValueError("refresh: must be >= 1")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError("block_length: must be >= 1")


@register(DelayedKV)
def delayed_kv(program: StepProgram, config: DelayedKV) -> PassResult:
    require_bidirectional(program, config.name)
    policy = {"policy": "delayed", "refresh": config.refresh, "block_length": config.block_length}
    return PassResult(add_kv_cache(program, policy), True)
