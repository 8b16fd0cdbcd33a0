"""The block decoders' sampler as graph code: what `fuse_decode {decoder: block}` puts after the head.

`dlmc.decoding.block` samples a block's rows two ways, both rebuilt here on [B, K, V] logits:

* Fast-dLLM v2 (remasking "threshold"): softmax(logits / T), top-p on the probabilities (zeroed and
  renormalised), one multinomial draw per row;
* SDAR (the low_confidence rules): logits / T, top-k then top-p on the logits (-inf), softmax, one
  multinomial draw per row, the arg-max at T = 0.

Both filters keep the same tokens with the same renormalised probabilities p_i / sum(kept), so one
formulation serves both; the two differ only in summation order (rounding). The draw is where
exactness comes from: on the CPU, torch.multinomial(probs, 1, generator=g) is
argmax(probs / q) with q = torch.empty_like(probs).exponential_(1, generator=g) (an exponential race;
tests/passes/test_block_pick.py checks it, generator state included). The runtime makes exactly that
call on each row's generator, in the reference's order and shape, and hands q in as `noise`; the graph
takes the arg-max. The runtime passes ones at T = 0, and top_k = V / top_p = inf for a filter that is off.
"""

from __future__ import annotations

import torch

from dlmc.artifact import TensorSpec


def sampling_inputs(vocab: int, logits_dtype: str) -> list[TensorSpec]:
    """The step inputs after head_rows when the block sampler is compiled in (`gumbel: true`)."""
    return [
        TensorSpec("noise", logits_dtype, ("batch", "rows", vocab)),
        TensorSpec("temperature", "float64", (1,)),
        TensorSpec("top_k", "int64", (1,)),
        TensorSpec("top_p", "float64", (1,)),
    ]


def top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scores [B, K, V] with every token outside the top_k [1] and the top_p [1] nucleus at -inf, as the
    reference samplers filter (ties with the k-th stay; the token that crosses p stays). Static shapes: a
    sort of every row; off filters come in as top_k = V and top_p = inf."""
    ranked, order = torch.sort(scores, dim=-1, descending=True)  # [B, K, V] each
    kth = ranked.gather(-1, (top_k - 1).expand(*ranked.shape[:-1], 1))  # [B, K, 1]
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    cumulative = torch.softmax(ranked, dim=-1).cumsum(-1)  # [B, K, V]
    over = cumulative > top_p.to(cumulative.dtype)  # compared in the scores' dtype, as the reference
    # shift right: the token that crosses p stays, and so does the best one
    drop = torch.cat([torch.zeros_like(over[..., :1]), over[..., :-1]], dim=-1)  # [B, K, V]
    ranked = ranked.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, ranked)  # [B, K, V] vocab order


def pick_block(
    logits: torch.Tensor,
    noise: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, K] int64, the probability each was drawn with [B, K] in the logits dtype, the same
    in float64) for logits [B, K, V]. Without noise: the arg-max of softmax(logits)."""
    if noise is None:
        probs = torch.softmax(logits, dim=-1)  # [B, K, V]
        tokens = probs.argmax(-1)  # [B, K]
    else:
        # the reference divides by a Python float: in the op-math type (float32 for bf16 / fp16 logits), the
        # scalar rounded to it, the quotient rounded back to the logits dtype
        opmath = torch.float64 if logits.dtype == torch.float64 else torch.float32
        tempered = (logits.to(opmath) / temperature.to(opmath)).to(logits.dtype)  # [B, K, V]
        scaled = torch.where(temperature > 0, tempered, logits)  # [B, K, V]
        probs = torch.softmax(top_k_top_p(scaled, top_k, top_p), dim=-1)  # [B, K, V]
        tokens = (probs / noise).argmax(-1)  # [B, K]: the exponential race (ones at T = 0: the arg-max)
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, K]
    return tokens, confidence, confidence.to(torch.float64)


def pick_llada2(
    logits: torch.Tensor,
    noise: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA2's samplers (`dlmc.decoding.llada2._sample`) on logits [B, K, V]: (tokens, confidence,
    argmax, argmax_confidence) [B, K]. tokens / confidence are the block sampler's draw (SDAR's filters
    are LLaDA2's), the arg-max of the probabilities at T = 0 (2.0's greedy token); argmax /
    argmax_confidence are the arg-max of the logits and its probability (2.1's greedy token; the two
    differ only where logits a rounding step apart round to one probability)."""
    tokens, confidence, _ = pick_block(logits, noise, temperature, top_k, top_p)
    argmax = logits.argmax(-1)  # [B, K]
    argmax_confidence = torch.softmax(logits, dim=-1).gather(-1, argmax.unsqueeze(-1)).squeeze(-1)  # [B, K]
    return tokens, confidence, argmax, argmax_confidence
