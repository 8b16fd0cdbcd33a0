"""Orthonormal Hadamard rotations (QuaRot, Ashkboos et al., 2024): for an orthogonal R,
x w^T = (x R)(w R)^T, and x R spreads an outlier channel's energy over all channels, so per-token int8
activations lose far less. R is a Sylvester Hadamard matrix / sqrt(n) for n a power of two; otherwise
a block-diagonal of the largest power-of-two Hadamard that divides n (still exactly orthogonal)."""

from __future__ import annotations

import torch


def hadamard(n: int) -> torch.Tensor:
    """[n, n] float32 orthonormal: R @ R.T == I."""
    block = n & -n  # largest power of two dividing n
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    h = h / h.shape[0] ** 0.5
    return torch.block_diag(*([h] * (n // block)))
