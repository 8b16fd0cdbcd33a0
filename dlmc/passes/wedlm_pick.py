"""WeDLM's fill rule as graph code: what `fuse_decode {decoder: wedlm}` puts after the head.

`dlmc.decoding.wedlm` reads the logits of a row's window masks [M, V] (logical order) each step and
decides which masks to fill, all rebuilt here on [B, K, V], the K head rows being each row's masks:

* a token per mask: the arg-max of softmax(logits) at temperature 0; else top-k, then top-p on the
  logits (-inf), softmax(logits / T) and one multinomial draw per mask. As in `dlmc.passes.block_pick`,
  the draw is argmax(probs / q) with q the Exp(1) variates torch.multinomial draws into probs' shape;
  the runtime draws q from the row's generator and hands it in as `noise` (ones at T = 0);
* the entropy of the unfiltered distribution (torch.distributions.Categorical's formula), plus
  pos_penalty per window slot a mask lies after the row's first mask;
* fill every mask whose adjusted entropy is below entropy_threshold, or the single lowest if none is.

`slots` [B, K] int64 names each head row's logical position (-1 for a padding row of a row with fewer
than K masks); only differences of positions matter, so any origin works. The threshold input is -inf
when the config has none (nothing is below it: one mask per step). The reference compares and scales
with Python floats, which the CPU kernels round to the logits dtype first; so does this graph.
"""

from __future__ import annotations

import torch

from dlmc.artifact import TensorSpec
from dlmc.passes.block_pick import top_k_top_p

OUTPUTS = ("tokens", "fill", "entropy")
"""tokens [B, K] int64, fill [B, K] bool, entropy [B, K] (logits dtype, unfiltered, before the penalty)."""


def rule_inputs(vocab: int, logits_dtype: str, sampling: bool) -> list[TensorSpec]:
    """The step inputs after head_rows: the fill rule's, then with sampling (`gumbel: true`) the draws
    and the filters."""
    inputs = [
        TensorSpec("slots", "int64", ("batch", "rows")),
        TensorSpec("pos_penalty", "float64", (1,)),
        TensorSpec("entropy_threshold", "float64", (1,)),
    ]
    if sampling:
        inputs += [
            TensorSpec("noise", logits_dtype, ("batch", "rows", vocab)),
            TensorSpec("temperature", "float64", (1,)),
            TensorSpec("top_k", "int64", (1,)),
            TensorSpec("top_p", "float64", (1,)),
        ]
    return inputs


def pick_wedlm(
    logits: torch.Tensor,
    slots: torch.Tensor,
    pos_penalty: torch.Tensor,
    entropy_threshold: torch.Tensor,
    noise: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, K] int64, fill [B, K] bool, entropy [B, K]) for the masks' logits [B, K, V]."""
    dtype = logits.dtype
    tokens = torch.softmax(logits, dim=-1).argmax(-1)  # [B, K]: the reference's greedy pick
    if noise is not None:
        tokens = torch.where(temperature > 0, _sampled(logits, noise, temperature, top_k, top_p), tokens)
    # Categorical(logits).entropy(): normalised logits, clamped, times their softmax
    normalized = logits - logits.logsumexp(dim=-1, keepdim=True)  # [B, K, V]
    probs = torch.softmax(normalized, dim=-1)  # [B, K, V]
    entropy = -(normalized.clamp(min=torch.finfo(dtype).min) * probs).sum(-1)  # [B, K]
    valid = slots >= 0  # [B, K]
    # the reference's slot indices are float32 whatever the logits dtype; the sum takes the wider type
    offset = (slots - slots[:, :1]).to(torch.float32)  # [B, K]: slots after the row's first mask
    adjusted = entropy + offset * pos_penalty.to(torch.float32)  # [B, K]
    adjusted = torch.where(valid, adjusted, float("inf"))
    below = (adjusted < entropy_threshold.to(adjusted.dtype)) & valid  # [B, K]
    lowest = torch.arange(logits.shape[1], device=logits.device) == adjusted.argmin(-1, keepdim=True)  # [B, K]
    # boolean logic, not a where on bools: ONNX Runtime's CPU Where has no bool kernel
    fill = below | (lowest & valid & ~below.any(-1, keepdim=True))  # [B, K]
    return tokens, fill, entropy


def _sampled(logits, noise, temperature, top_k, top_p) -> torch.Tensor:
    """`dlmc.decoding.wedlm._sample` at temperature > 0: filters on the raw logits, then the tempered
    softmax's exponential race. Off filters come in as top_k = V and top_p = inf. -> [B, K] int64"""
    filtered = top_k_top_p(logits, top_k, top_p)  # [B, K, V]
    t = torch.where(temperature > 0, temperature, 1.0).to(logits.dtype)  # a Python float in the reference
    probs = torch.softmax(filtered / t, dim=-1)  # [B, K, V]
    return (probs / noise).argmax(-1)  # [B, K]
