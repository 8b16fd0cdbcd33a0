"""The two operators a quantized step calls, `torch.ops.dlmc.*`, defined with plain ATen ops.

They are CompositeImplicitAutograd: torch.export keeps them as single nodes (so the ONNX lowering can
translate each one into QDQ / MatMulNBits, see dlmc.quant.onnx), while eager execution and Inductor
see their ATen bodies (Inductor fuses the dequantization into the matmul's producer). Importing this
module registers them; the runtime imports it before it deserializes a graph that uses them.

  linear_woq(x, qweight, scale, zero?, bias?, bits) -> y [..., out]     weight-only (W8A16, W4A16)
      y = x @ dequantize(qweight)^T + bias, the weight dequantized in scale's dtype. Layouts (the
      ONNX lowering's, so no reshapes sit between the stored tensors and the ONNX operators):
        bits 8: qweight [out, in] int8 (uint8 with zero), scale and zero [out, G]
        bits 4: qweight [out, G, gs // 2] uint8 (MatMulNBits' blocks), scale and zero [out * G]
  linear_w8a8(x, qweight int8 [out, in], scale [out, 1], bias?, act_scale?) -> y [..., out]
      x is quantized to int8 per token (absmax / 127, computed on the fly) or, when act_scale is
      given, per tensor with that static scale; y = (x_q @ qweight^T) * x_scale * scale + bias, the
      product in int32 (aten._int_mm; on CUDA padded to the shapes its int8 GEMM accepts).
  grouped_woq(x [N, in], qweight, scale, zero?, offs int32 [E], bits) -> [N, out]     MoE experts, weight-only
      torch.ops.dlmc.grouped_mm with each expert's weight dequantized: the layouts above stacked over E
      (bits 8: qweight [E, out, in], scale and zero [E, out, G]; bits 4: qweight [E, out, G, gs // 2],
      scale and zero [E, out * G]). Correctness first: every call dequantizes all E experts into a float
      [E, in, out] (the float weights' size, transient) before the grouped matmul, so a step reads the
      small form but also writes and reads back the float one; Inductor fuses the dequantization into one
      kernel, not into the grouped matmul. What it saves is the memory the weights occupy at rest.
  grouped_w8a8(x [N, in], qweight int8 [E, out, in], scale float32 [E, out], offs int32 [E]) -> [N, out]
      MoE experts, W8A8: x quantized to int8 per token (as linear_w8a8), then per expert segment of the
      sorted rows one int8 x int8 -> int32 product (aten._int_mm), rescaled in fp32 and cast to x's dtype.
      An opaque custom op (not composite): the per-segment loop reads offs on the host, so export keeps
      one node, Inductor calls it as is, and nothing dequantizes the weights.
"""

from __future__ import annotations

import torch

import dlmc.models.grouped  # noqa: F401  (registers torch.ops.dlmc.grouped_mm, which grouped_woq calls)

_LIB = torch.library.Library("dlmc", "DEF")
_LIB.define("linear_woq(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, Tensor? bias, int bits) -> Tensor")
_LIB.define("linear_w8a8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, Tensor? act_scale) -> Tensor")
_LIB.define("grouped_woq(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, Tensor offs, int bits) -> Tensor")

INT8_MAX = 127


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """w [out, in] in scale's dtype from the stored layout (see the module docstring)."""
    out = qweight.shape[0]
    if bits == 4:  # qweight: [out, G, gs // 2] uint8, two codes per byte, even column low
        low = torch.bitwise_and(qweight, 15)
        high = torch.bitwise_right_shift(qweight, 4)
        codes = torch.stack((low, high), dim=-1).reshape(out, qweight.shape[1], -1)  # [out, G, gs] uint8
    else:
        groups = scale.shape[1]
        codes = qweight.reshape(out, groups, -1)  # [out, G, gs] int8 (symmetric) or uint8 (with zero)
    groups = codes.shape[1]
    q = codes.to(scale.dtype)
    if zero is not None:
        q = q - zero.reshape(out, groups, 1).to(scale.dtype)
    elif bits == 4:
        q = q - 8  # symmetric int4 is stored shifted by +8
    return (q * scale.reshape(out, groups, 1)).reshape(out, -1)


def linear_woq_eager(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """The op's maths in plain torch (its CPU implementation, and the Triton kernel's reference)."""
    return torch.nn.functional.linear(x, dequantize_weight(qweight, scale, zero, bits).to(x.dtype), bias)


def dequantize_experts(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """w [E, in, out] (grouped_mm's layout) in scale's dtype from the stacked layout (module docstring)."""
    experts, out = qweight.shape[:2]
    rows = experts * out  # every expert's output channels, one after the other: the 2-D layout's rows
    if bits == 4:
        flat_scale, flat_zero = scale.reshape(-1), (zero.reshape(-1) if zero is not None else None)
    else:
        flat_scale = scale.reshape(rows, -1)
        flat_zero = zero.reshape(rows, -1) if zero is not None else None
    w = dequantize_weight(qweight.reshape(rows, *qweight.shape[2:]), flat_scale, flat_zero, bits)  # [E*out, in]
    return w.reshape(experts, out, -1).transpose(1, 2)  # [E, in, out]


def _grouped_woq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    offs: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    # x: [N, in] rows sorted by expert -> [N, out]; contiguous: the grouped kernel reads [E, in, out] rows
    w = dequantize_experts(qweight, scale, zero, bits).to(x.dtype).contiguous()
    return torch.ops.dlmc.grouped_mm(x, w, offs)


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
    xq = torch.clamp(torch.round(x / s), -INT8_MAX - 1, INT8_MAX).to(torch.int8)  # [..., in]
    # int8 x int8 -> int32 (VNNI on this CPU: 2.8x the fp32 matmul, benchmarks/int8_matmul.py)
    rows = xq.reshape(-1, xq.shape[-1])  # [rows, in] int8
    acc = padded_int_mm(rows, qweight) if x.is_cuda else torch._int_mm(rows, qweight.t())  # [rows, out] int32
    acc = acc.reshape(*x.shape[:-1], qweight.shape[0])
    # The int32 sums reach 127 * 127 * in (66k at in=64): cast to fp16 (max 65504) they overflow to inf,
    # so rescale in fp32 and cast the layer's output, which is of ordinary size, back.
    wide = torch.promote_types(x.dtype, torch.float32)
    y = (acc.to(wide) * (s.to(wide) * scale.reshape(-1).to(wide))).to(x.dtype)  # [..., out]
    return y if bias is None else y + bias


def padded_int_mm(a: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """a @ qweight^T in int32, shaped for CUDA's int8 GEMM, which refuses fewer than 17 rows and inner or
    output sizes that are not multiples of 8. Zero rows and columns add nothing to the sums and are cut
    away after. The row padding is always 16, not "up to 17", so a dynamic row count (a cached step's few
    queries) needs no guard on its size when the step is exported."""
    # a: [rows, in] int8; qweight: [out, in] int8 -> [rows, out] int32
    out, inner = qweight.shape
    inner_pad, out_pad = -inner % 8, -out % 8
    a = torch.nn.functional.pad(a, (0, inner_pad, 0, 16))  # [rows + 16, in'] int8
    w = torch.nn.functional.pad(qweight, (0, inner_pad, 0, out_pad))  # [out', in'] int8
    acc = torch._int_mm(a, w.t())  # [rows + 16, out'] int32; w.t() is column-major, as cuBLASLt wants
    return acc[: a.shape[0] - 16, :out]


@torch.library.custom_op("dlmc::grouped_w8a8", mutates_args=())
def _grouped_w8a8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # x: [N, in] rows sorted by expert; qweight: [E, out, in] int8; scale: [E, out]; offs: [E] int32 -> [N, out]
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / INT8_MAX  # [N, 1] per token, x's dtype
    xq = torch.clamp(torch.round(x / s), -INT8_MAX - 1, INT8_MAX).to(torch.int8)  # [N, in]
    wide = torch.promote_types(x.dtype, torch.float32)  # int32 sums overflow fp16: rescale wide (linear_w8a8)
    out = x.new_empty(x.shape[0], qweight.shape[1])  # [N, out]
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:  # an expert no row was routed to runs nothing
            rows = xq[start:end]  # [n, in] int8
            acc = padded_int_mm(rows, qweight[e]) if x.is_cuda else torch._int_mm(rows, qweight[e].t())  # [n, out]
            out[start:end] = (acc.to(wide) * (s[start:end].to(wide) * scale[e].to(wide))).to(x.dtype)
        start = end
    return out


@_grouped_w8a8.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[1])


_LIB.impl("linear_woq", linear_woq_eager, "CompositeImplicitAutograd")
_LIB.impl("linear_w8a8", _linear_w8a8, "CompositeImplicitAutograd")
_LIB.impl("grouped_woq", _grouped_woq, "CompositeImplicitAutograd")

linear_woq = torch.ops.dlmc.linear_woq.default
linear_w8a8 = torch.ops.dlmc.linear_w8a8.default
grouped_woq = torch.ops.dlmc.grouped_woq.default
grouped_w8a8 = torch.ops.dlmc.grouped_w8a8.default
