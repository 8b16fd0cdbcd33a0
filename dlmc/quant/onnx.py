"""ONNX lowering of the dlmc quantized operators (a torch.onnx custom translation table).

  linear_woq, 4 bits  -> com.microsoft MatMulNBits (symmetric, block size a power of two >= 16); the
                         stored [out, G, gs // 2] blocks and flat scales are its B and scales inputs
  linear_woq, 8 bits  -> blocked DequantizeLinear (opset 21) + MatMul
  linear_w8a8, static -> QuantizeLinear / DequantizeLinear on the activation (per tensor) and
                         DequantizeLinear on the weight: the QDQ form ONNX Runtime and TensorRT fuse
  linear_w8a8, dynamic-> per-token scale (ReduceMax |x| / 127), int8 codes, MatMulInteger (int32
                         accumulation), rescale: the same arithmetic as the torch operator
"""

from __future__ import annotations

from typing import Any

from dlmc.quant.scheme import Scheme

MIN_BLOCKED_OPSET = 21


def unsupported(scheme: Scheme, opset: int | None) -> list[str]:
    """What the ONNX lowering cannot run of `scheme`, one line each."""
    problems = []
    if scheme.bits == 4:
        if not scheme.symmetric:
            problems.append("quantize: asymmetric int4 has no ONNX lowering here (MatMulNBits takes symmetric int4); "
                            "use symmetric: true")
        g = scheme.group_size
        if g is None or g < 16 or g & (g - 1):
            problems.append(f"quantize.group_size: int4 on ONNX (MatMulNBits) needs a power of two >= 16, got {g}")
    elif scheme.activations != "per_token" and (opset or 0) < MIN_BLOCKED_OPSET:
        problems.append(
            f"lower.opset: int8 weights lower to blocked DequantizeLinear, which needs opset >= {MIN_BLOCKED_OPSET}"
        )
    return problems


def translation_table() -> dict[Any, Any]:
    from onnxscript import ir
    import torch
    from onnxscript import opset20 as op20
    from onnxscript import opset21 as op21
    from onnxscript import values

    import dlmc.quant.ops  # noqa: F401

    matmul_nbits = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())

    def linear_woq(x, qweight, scale, zero=None, bias=None, bits: int = 8):
        if bits == 4:
            n, blocks, blob = (int(d) for d in qweight.shape)
            block = blob * 2
            y = matmul_nbits(x, qweight, scale, K=blocks * block, N=n, bits=4, block_size=block)
        else:
            y = op20.MatMul(x, _dequantize_transposed(op21, qweight, scale, zero))
        return y if bias is None else op20.Add(y, bias)

    def linear_w8a8(x, qweight, scale, bias=None, act_scale=None):
        if act_scale is not None:  # static per tensor: QDQ
            zero = op20.Constant(value=ir.tensor(0, dtype=ir.DataType.INT8))
            xq = op20.QuantizeLinear(x, act_scale, zero)
            xd = op20.DequantizeLinear(xq, act_scale, zero)
            y = op20.MatMul(xd, _dequantize_transposed(op21, qweight, scale, None))
        else:  # dynamic per token
            s = op20.Div(op20.Max(op20.ReduceMax(op20.Abs(x), op20.Constant(value_ints=[-1]), keepdims=1),
                                  op20.CastLike(op20.Constant(value_float=1e-8), x)),
                         op20.CastLike(op20.Constant(value_float=127.0), x))  # [..., 1]
            codes = op20.Clip(op20.Round(op20.Div(x, s)), op20.CastLike(op20.Constant(value_float=-128.0), x),
                              op20.CastLike(op20.Constant(value_float=127.0), x))
            xq = op20.Cast(codes, to=ir.DataType.INT8)
            acc = op20.MatMulInteger(xq, op20.Transpose(qweight, perm=[1, 0]))  # int32 [..., out]
            y = op20.Mul(op20.Mul(op20.CastLike(acc, x), s), op20.Transpose(scale, perm=[1, 0]))
        return y if bias is None else op20.Add(y, bias)

    return {torch.ops.dlmc.linear_woq.default: linear_woq, torch.ops.dlmc.linear_w8a8.default: linear_w8a8}


def _dequantize_transposed(op: Any, qweight: Any, scale: Any, zero: Any) -> Any:
    """w^T [in, out] from codes [out, in] and scales [out, G]: blocked DequantizeLinear (opset 21),
    also for one block per row. Not per-axis: onnxruntime 1.32 fuses a per-axis int8
    DequantizeLinear + MatMul into MatMulNBits and computes it wrongly (measured: logits off by 10%)."""
    block = int(qweight.shape[1]) // int(scale.shape[1])
    if zero is not None:
        w = op.DequantizeLinear(qweight, scale, zero, axis=1, block_size=block)
    else:
        w = op.DequantizeLinear(qweight, scale, axis=1, block_size=block)
    return op.Transpose(w, perm=[1, 0])


def _matmul_nbits_schema() -> Any:
    """onnx ships no schemas for ONNX Runtime's com.microsoft operators; the exporter needs one to
    build the node, so this states the subset of MatMulNBits (ONNX Runtime contrib ops) used here."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    return OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[
            attr("K", OpSchema.AttrType.INT, "input features"),
            attr("N", OpSchema.AttrType.INT, "output features"),
            attr("bits", OpSchema.AttrType.INT, "bits per weight"),
            attr("block_size", OpSchema.AttrType.INT, "weights per scale"),
        ],
    )
