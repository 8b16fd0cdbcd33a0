"""Orthonormal Hadamard rotations (QuaRot, Ashkboos et al., 2024): for an orthogonal R,
x w^T = (x R)(w R)^T, and x R spreads an outlier channel's energy over all channels, so per-token int8
activations lose far less. R is a Sylvester Hadamard matrix / sqrt(n) for n a power of two; otherwise
a block-diagonal of the largest power-of-two Hadamard that divides n (still exactly orthogonal).

Applied online, x R is never a dense [n, n] product: a Sylvester Hadamard block of size b = b1 * b2
is the Kronecker product H_b1 (x) H_b2, so each block of x, viewed as a [b1, b2] matrix X, maps to
H_b1 X H_b2: n (b1 + b2) multiply-adds per row instead of n^2 (benchmarks/hadamard.py)."""

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


def kronecker_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [b1, b1], B [b2, b2]), orthonormal Hadamard, with hadamard(n) = I (x) A (x) B: b1 * b2 is the
    largest power of two dividing n, split as evenly as powers of two allow."""
    block = n & -n
    b1 = 1 << ((block.bit_length() - 1) // 2)
    return hadamard(b1), hadamard(block // b1)


def rotate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ hadamard(n) for x [..., n], from the factors (A, B) of kronecker_factors(n)."""
    y = x.unflatten(-1, (-1, a.shape[0], b.shape[0]))  # [..., n / (b1 b2), b1, b2]
    y = torch.matmul(a, torch.nn.functional.linear(y, b))  # A Y B per block (A, B symmetric)
    return y.flatten(-3)  # [..., n]
