"""Which of a step's candidate tokens to commit: LLaDA's and Fast-dLLM v1's rules on [B, K] tensors.

The reference decoder (`dlmc.decoding.llada`) chooses per row with Python-sized results (`topk` over a
count it reads back); here every rule is a mask over the K committable rows of every row at once, with
static shapes (sorts and cumulative counts), so the loop around a fused step never leaves the device.
`confidence` is -inf wherever a row is not eligible (not a mask, or outside the row's block).
"""

from __future__ import annotations

import torch


def top_k_rows(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """LLaDA's schedule with each row's own count: the k[b] most confident eligible rows of row b (rows
    at different steps of their blocks). confidence [B, K], k [B] -> [B, K] bool"""
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices  # [B, K]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(confidence.shape[-1], device=order.device)
                                            .expand_as(order))  # [B, K]: each entry's place in its row
    return rank < k[:, None]


def above_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM v1 threshold: every eligible row at or above the threshold, and always the most
    confident one. [B, K] -> [B, K] bool"""
    best = confidence.argmax(-1, keepdim=True)  # [B, 1]
    keep = confidence >= threshold  # -inf (not eligible) never passes a threshold in (0, 1]
    return keep.scatter_(-1, best, True)


def factor_prefix(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM v1 factor rule: the longest confidence-sorted prefix whose j-th (1-based) entry
    reaches 1 - factor / (j + 1), the first always; like the official code (and
    `dlmc.decoding.llada.factor_accept_count`) a failure at the last candidate accepts all of them.
    [B, K] -> [B, K] bool"""
    ranked, order = torch.sort(confidence, dim=-1, descending=True)  # [B, K] each
    K = confidence.shape[-1]
    j = torch.arange(K, device=confidence.device)  # [K]: 0-based rank
    candidates = (confidence > float("-inf")).sum(-1, keepdim=True)  # [B, 1]
    fails = (ranked < 1 - factor / (j + 2)) & (j >= 1) & (j < candidates)  # [B, K]
    first = torch.where(fails, j, K).amin(-1, keepdim=True)  # [B, 1]: K when nothing fails
    count = torch.where((first == K) | (first == candidates - 1), candidates, first)  # [B, 1]
    accepted = j < count  # [B, K] in sorted order
    return torch.zeros_like(accepted).scatter_(-1, order, accepted)
