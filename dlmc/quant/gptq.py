"""GPTQ (Frantar et al., 2022): quantize a weight column by column, each time spreading the column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error, H = 2 X^T X / n over the calibration inputs X [n, in].

As in the paper: dead inputs (zero Hessian diagonal) get weight 0, the Hessian is damped by
`damp * mean(diag H)`, the inverse is taken through its Cholesky factor (upper), and the updates are
applied lazily in blocks of `block_size` columns (inside a block per column, to the rest of the matrix
once per block). With `act_order` columns are visited in order of decreasing diag(H); group
parameters then come from the groups of the original weight ("static groups"), so the stored layout
stays contiguous groups of columns.
"""

from __future__ import annotations

import torch

from dlmc.errors import DlmcError
from dlmc.quant.formats import QuantizedWeight, group_params, qrange


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    group_size: int,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    layer: str = "weight",
) -> QuantizedWeight:
    out, inn = w.shape  # w: [out, in], hessian: [in, in]
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = act_order or group_size == inn
    if static:  # parameters fixed up front from the (dead-zeroed) weight
        scale, zero = group_params(W, bits, symmetric, group_size)
    else:
        scale = torch.empty(out, inn // group_size)
        zero = None if symmetric else torch.empty(out, inn // group_size, dtype=torch.int16)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(inn)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(inn)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # [in, in] upper
    except torch.linalg.LinAlgError:
        raise DlmcError(
            f"quantize: the calibration Hessian of {layer} is not positive definite; raise gptq_damp"
        ) from None

    lo, hi = qrange(bits, symmetric)
    codes = torch.zeros(out, inn, dtype=torch.int16)  # in permuted column order
    # Groups never straddle a block when the block is a multiple of the group size.
    block = group_size * max(1, block_size // group_size) if not static else block_size
    for i1 in range(0, inn, block):
        i2 = min(i1 + block, inn)
        W1 = W[:, i1:i2].clone()  # [out, b]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # original column index
            g = col // group_size
            if not static and col % group_size == 0:  # first column of a group: fit the group as it is now
                s, z = group_params(W1[:, i : i + group_size], bits, symmetric, group_size)
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0]
            s = scale[:, g]
            z = zero[:, g].float() if zero is not None else 0.0
            w_col = W1[:, i]
            q = torch.clamp(torch.round(w_col / s) + z, lo, hi)
            codes[:, i1 + i] = q.to(torch.int16)
            err = (w_col - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return QuantizedWeight(codes[:, inverse].contiguous(), scale, zero, bits, group_size)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / n for inputs x [..., in]."""
    x = x.reshape(-1, x.shape[-1]).double()
    return (2 * x.T @ x / x.shape[0]).float()
