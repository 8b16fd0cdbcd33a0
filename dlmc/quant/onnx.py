"""ONNX lowering of the dlmc quantized operators (a torch.onnx custom translation table).

  linear_woq, 4 bits  -> com.microsoft MatMulNBits (symmetric, block size a power of two >= 16); the
                         stored [out, G, gs // 2] blocks and flat scales are its B and scales inputs.
                         With `lower.int4: qdq` (the default) each one is then rewritten as a blocked
                         int4 DequantizeLinear + MatMul (int4_qdq), the standard form TensorRT parses
                         and ONNX Runtime fuses back into MatMulNBits
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


def unsupported(scheme: Scheme, opset: int | None, int4: str = "qdq") -> list[str]:
    """What the ONNX lowering cannot run of `scheme`, one line each."""
    problems = []
    if scheme.bits == 4:
        if not scheme.symmetric:
            problems.append("quantize: asymmetric int4 has no ONNX lowering here (MatMulNBits and TensorRT's int4 "
                            "DequantizeLinear take symmetric int4); use symmetric: true")
        g = scheme.group_size
        if g is None or g < 16 or g & (g - 1):
            problems.append(f"quantize.group_size: int4 on ONNX (MatMulNBits) needs a power of two >= 16, got {g}")
        if int4 == "qdq" and (opset or 0) < MIN_BLOCKED_OPSET:
            problems.append(f"lower.opset: int4 weights lower to blocked int4 DequantizeLinear, which needs opset >= "
                            f"{MIN_BLOCKED_OPSET} (or lower.int4: matmulnbits, for ONNX Runtime only)")
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
            # rescaled in fp32: the int32 sums overflow fp16 (see dlmc.quant.ops._linear_w8a8)
            f32 = ir.DataType.FLOAT
            y = op20.Mul(op20.Mul(op20.Cast(acc, to=f32), op20.Cast(s, to=f32)),
                         op20.Cast(op20.Transpose(scale, perm=[1, 0]), to=f32))
            y = op20.CastLike(y, x)
        return y if bias is None else op20.Add(y, bias)

    return {torch.ops.dlmc.linear_woq.default: linear_woq, torch.ops.dlmc.linear_w8a8.default: linear_w8a8}


def int4_qdq(model: Any) -> int:
    """Rewrite each MatMulNBits node of `model` (an onnx ModelProto, initializers inline) as
    DequantizeLinear(int4 W^T [K, N], scales [K / block, N], axis 0, block_size) + MatMul, in place;
    returns how many. Signed int4 without a zero point: TensorRT's dequantize layer rejects one, and the
    codes are exactly MatMulNBits' (stored with +8) minus 8. ONNX Runtime fuses the pair back into
    MatMulNBits (the session asks for fp32 accumulation, like the plain MatMulNBits node)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    converted: dict[str, tuple[str, str]] = {}  # B name -> (int4 weight, scales) initializer names
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        a, b, scales = node.input[:3]
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        if b not in converted:
            blob = numpy_helper.to_array(inits[b])  # [N, G, block // 2] uint8, even column low
            codes = np.stack((blob & 15, blob >> 4), axis=-1).reshape(n, k).astype(np.int8) - 8  # [N, K]
            flat = np.ascontiguousarray(codes.T).reshape(-1).view(np.uint8) & 15  # [K * N] nibbles, W^T order
            if flat.size % 2:
                flat = np.append(flat, np.uint8(0))
            packed = flat[0::2] | (flat[1::2] << 4)  # ONNX int4: first element in the low nibble
            weight = helper.make_tensor(b + "_int4", TensorProto.INT4, [k, n], packed.tobytes(), raw=True)
            s = numpy_helper.to_array(inits[scales]).reshape(n, k // block).T  # [K / block, N]
            graph.initializer.extend([weight, numpy_helper.from_array(np.ascontiguousarray(s), scales + "_kn")])
            converted[b] = (weight.name, scales + "_kn")
        weight_name, scale_name = converted[b]
        dequantized = node.output[0] + "_weight"
        nodes.append(helper.make_node("DequantizeLinear", [weight_name, scale_name], [dequantized],
                                      name=node.name + "_dq", axis=0, block_size=block))
        nodes.append(helper.make_node("MatMul", [a, dequantized], list(node.output), name=node.name + "_matmul"))
        count += 1
    if count:
        used = {name for node in nodes for name in node.input}
        replaced = set(converted) | {node.input[2] for node in graph.node if node.op_type == "MatMulNBits"}
        kept = [init for init in graph.initializer if init.name in used or init.name not in replaced]
        del graph.node[:], graph.initializer[:]
        graph.node.extend(nodes)
        graph.initializer.extend(kept)
        if not any(node.domain == "com.microsoft" for node in nodes):
            kept_opsets = [o for o in model.opset_import if o.domain != "com.microsoft"]
            del model.opset_import[:]
            model.opset_import.extend(kept_opsets)
    return count


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
