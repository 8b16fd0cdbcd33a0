"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights with a per-input-channel
scale, x' = x / s, w' = w * s (exact in float), s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), so
that both x' and w' quantize well to int8."""

from __future__ import annotations

import torch


def smooth_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] from the calibration activation absmax per channel [in] and the weight w [out, in]."""
    a = act_absmax.float().clamp(min=1e-5)
    wmax = w.float().abs().amax(0).clamp(min=1e-5)  # [in]
    return (a.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
