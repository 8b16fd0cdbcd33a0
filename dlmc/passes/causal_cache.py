"""causal_cache: reuse the K/V of the unchanged prefix, for causal and block-causal models (exact).

Under causal attention a column's K/V and logits depend only on the columns up to it; under block-causal
attention, on its own block and the blocks before. So whatever a decoder changes, everything before the
first changed column (rounded down to its block) is computed exactly as last step, and only the rest is
recomputed. This is Fast-dLLM v2's block cache, and together with WeDLM's topological reordering (the
WeDLM decoder moves filled tokens in front of the masks, keeping their logical positions) it is WeDLM's
causal prefix cache: the committed text is computed once. Token-identical to the uncached decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmc.capture import StepProgram
from dlmc.errors import DlmcError
from dlmc.passes import PassConfig, PassResult, register
from dlmc.passes.kv_cache import add_kv_cache
from dlmc.runtime.policies import CachePolicy, Exact


@dataclass(frozen=True, kw_only=True)
class CausalCache(PassConfig):
    """K/V cache of the unchanged (block-aligned) prefix; exact."""

    name: ClassVar[str] = "causal_cache"
    exact: ClassVar[bool] = True
    kv_cache: ClassVar[bool] = True

    def policy(self) -> CachePolicy:
        return Exact()


@register(CausalCache)
def causal_cache(program: StepProgram, config: CausalCache) -> PassResult:
    if program.spec.attention == "bidirectional":
        raise DlmcError(
            f"causal_cache: supports causal and block-causal families (WeDLM, Fast-dLLM v2, SDAR), not "
            f"{program.spec.family}, whose attention is bidirectional: use block_cache, delayed_kv or window_pruning"
        )
    return PassResult(add_kv_cache(program, config.policy().to_dict()), True)
