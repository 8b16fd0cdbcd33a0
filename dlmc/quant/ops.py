"""The two operators a quantized step calls, `torch.ops.dlmc.*`, defined with plain ATen ops.

They are CompositeImplicitAutograd: torch.export keeps them as single nodes (so the ONNX lowering can
translate each one into QDQ / MatMulNBits, see dlmc.quant.onnx), while eager execution and Inductor
see their ATen bodies (Inductor fuses the dequantization into the matmul's producer). Importing this
module registers them; the runtime imports it before it deserializes a graph that uses them.

  dequant_weight(qweight, scale, zero?, bits, group_size) -> w [out, in] in scale's dtype
  linear_w8a8(x, qweight int8 [out, in], scale [out], bias?, act_scale?) -> y [..., out]
      x is quantized to int8 per token (absmax / 127, computed on the fly) or, when act_scale is
      given, per tensor with that static scale; y = (x_q @ qweight^T) * x_scale * scale + bias.
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("dlmc", "DEF")
_LIB.define("dequant_weight(Tensor qweight, Tensor scale, Tensor? zero, int bits, int group_size) -> Tensor")
_LIB.define("linear_w8a8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, Tensor? act_scale) -> Tensor")

INT8_MAX = 127


def _dequant_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    if bits == 4:  # qweight: [out, in // 2] uint8, two codes per byte, even column low
        low = torch.bitwise_and(qweight, 15)
        high = torch.bitwise_right_shift(qweight, 4)
        codes = torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)  # [out, in] uint8
    else:
        codes = qweight  # [out, in] int8 (symmetric) or uint8 (with zero)
    out, inn = codes.shape
    q = codes.to(scale.dtype).reshape(out, inn // group_size, group_size)  # [out, G, gs]
    if zero is not None:
        q = q - zero.to(scale.dtype).unsqueeze(-1)
    elif bits == 4:
        q = q - 8  # symmetric int4 is stored shifted by +8
    return (q * scale.unsqueeze(-1)).reshape(out, inn)


def _linear_w8a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
) -> torch.Tensor:
    if act_scale is None:
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / INT8_MAX  # [..., 1] per token
    else:
        s = act_scale.to(x.dtype)  # [] per tensor
    xq = torch.clamp(torch.round(x / s), -INT8_MAX - 1, INT8_MAX)  # [..., in] integer-valued
    # Integer-valued operands: the float matmul equals the int32 one while |sum| < 2^24.
    y = torch.matmul(xq, qweight.to(x.dtype).t()) * (s * scale.to(x.dtype))  # [..., out]
    return y if bias is None else y + bias


_LIB.impl("dequant_weight", _dequant_weight, "CompositeImplicitAutograd")
_LIB.impl("linear_w8a8", _linear_w8a8, "CompositeImplicitAutograd")

dequant_weight = torch.ops.dlmc.dequant_weight.default
linear_w8a8 = torch.ops.dlmc.linear_w8a8.default
