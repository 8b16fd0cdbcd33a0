"""`torch.ops.dlmc.grouped_mm`: one matmul per expert over the rows sorted by expert, reading each expert's
weight where it is stored (no gathered copy). Importing this module registers it; the runtime imports it
before it loads a graph that calls it.

  grouped_mm(x [N, in], w [E, in, out], offs int32 [E]) -> [N, out]
      rows offs[e-1]:offs[e] (offs[-1] = 0) times w[e]; offs are the cumulative row counts. w may also be
      the transposed view of contiguous [E, out, in] matrices (the published layout of Gemma-4's experts).

Why an operator of our own rather than aten._grouped_mm directly: aten's shape function (meta) accepts
bf16 only, so a float32 step would not export, although the CPU kernel runs float32 and float16 too.
The kernel is aten's where it has one (float32 / bf16 / float16 with rows a multiple of 16 bytes);
otherwise (float64, which the parity tests use, or odd widths) the same per-expert products run as one
torch.mm per expert on slices. Both read the weights in place; neither drops a row.
"""

from __future__ import annotations

import torch

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("dlmc::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # x: [N, in], w: [E, in, out], offs: [E] int32 -> [N, out]
    if _has_kernel(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


@grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


def _has_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], w.shape[2]))
    # aten's kernel also reads w as the transposed view of contiguous [E, out, in] matrices (published layouts)
    in_place = w.is_contiguous() or w.transpose(1, 2).is_contiguous()
    return x.dtype in _KERNEL_DTYPES and x.dtype == w.dtype and x.is_contiguous() and in_place and aligned
