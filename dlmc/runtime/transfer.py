"""Which of a step's candidate tokens to commit: LLaDA's and Fast-dLLM v1's rules on [B, K] tensors.

The rules live with the other decoding strategies (`dlmc.strategies`); this module keeps their
historical names. The reference decoder (`dlmc.decoding.llada`) chooses per row with Python-sized
results (`topk` over a count it reads back); here every rule is a mask over the K committable rows of
every row at once, with static shapes (sorts and cumulative counts), so the loop around a fused step
never leaves the device. `confidence` is -inf wherever a row is not eligible.
"""

from __future__ import annotations

from dlmc.strategies.factor import factor_prefix
from dlmc.strategies.threshold import above_threshold
from dlmc.strategies.top_k import top_k

__all__ = ["above_threshold", "factor_prefix", "top_k"]
