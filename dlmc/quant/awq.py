"""AWQ-style scale search (Lin et al., 2023): protect the weight columns that meet large activations by
scaling them up before rounding, w' = w * s, and the input down, x' = x / s (exact in float).

s = mean|x_j|^alpha per input channel, normalised so that sqrt(max s * min s) = 1; alpha is picked
from a grid on [0, 1) by the output error on calibration inputs. alpha = 0 is plain RTN, so the search
never does worse than RTN on the calibration set.
"""

from __future__ import annotations

import torch

from dlmc.quant.formats import QuantizedWeight, rtn


def awq(
    w: torch.Tensor, x: torch.Tensor, *, bits: int, symmetric: bool, group_size: int, grid: int = 20
) -> tuple[QuantizedWeight, torch.Tensor, float]:
    """(quantized w * s, s [in], alpha) minimising |x w^T - (x / s) deq(w * s)^T|^2 over the grid."""
    w = w.float()  # [out, in]
    x = x.reshape(-1, x.shape[-1]).float()  # [n, in]
    reference = x @ w.T  # [n, out]
    act = x.abs().mean(0).clamp(min=1e-6)  # [in]
    best: tuple[float, QuantizedWeight, torch.Tensor, float] | None = None
    for k in range(grid):
        alpha = k / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        qw = rtn(w * s, bits, symmetric, group_size)
        err = ((x / s) @ qw.dequantize().T - reference).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, qw, s, alpha)
    _, qw, s, alpha = best
    return qw, s, alpha
