"""The stacked experts of an MoE layer quantized: the numerics behind the quantize pass for a weight
[E, in, out] that torch.ops.dlmc.grouped_mm reads (dlmc.models.moe), apart from the graph edit.

Round to nearest, per expert and per output channel or group of input channels: each expert's matrix,
transposed to the [out, in] of a linear, is quantized exactly as a linear's weight, and the experts'
results are stacked. RTN rounds each output row on its own, so quantizing the E experts' rows as one
[E * out, in] matrix is the per-expert quantization. Weight-only (W8A16 / W4A16) runs through
ops.grouped_woq; W8A8 (int8 per-channel weights, activations: per_token) through ops.grouped_w8a8, which
quantizes each routed token on the fly and multiplies in int8, its weight scales kept in float32.

GPTQ and AWQ are refused for experts: their statistics would have to be each expert's routed inputs,
which calibration does not separate; so are static per-tensor activation scales and the outlier
transforms (SmoothQuant, Hadamard), which would need the same per-expert statistics.
"""

from __future__ import annotations

import torch

from dlmc.errors import DlmcError
from dlmc.quant import ops
from dlmc.quant.calibration import LayerStats
from dlmc.quant.formats import check_group_size, rtn, sqnr_db
from dlmc.quant.layer import QuantizedLayer, summary
from dlmc.quant.scheme import Scheme


def check_expert_scheme(name: str, scheme: Scheme) -> None:
    """One line when `scheme` cannot quantize the experts `name` (before any calibration)."""
    if scheme.activations == "per_tensor":
        raise DlmcError(f"quantize.activations: {scheme.label()} on the experts {name}: a static scale would need "
                        "each expert's routed inputs; use activations: per_token (or none) for them")
    if scheme.outliers != "none":
        raise DlmcError(f"quantize.outliers: {scheme.outliers} on the experts {name} would need each expert's "
                        "routed inputs; use outliers: none for them (a rule matching '*.experts_*')")
    if scheme.method != "rtn":
        raise DlmcError(f"quantize.method: {scheme.method} on the experts {name} would need each expert's routed "
                        "inputs to calibrate; use method: rtn for them (a rule matching '*.experts_*')")


def quantize_experts(name: str, w: torch.Tensor, scheme: Scheme, stats: LayerStats) -> QuantizedLayer:
    """Quantize stacked experts w [E, in, out] under an RTN `scheme` (weight-only or W8A8 per token); `stats`
    (the inputs of the grouped matmul, every expert's rows together) only feed the report: RTN does not
    read them."""
    check_expert_scheme(name, scheme)
    w = w.detach().float().cpu()  # quantization runs on the host
    experts, inn, out = w.shape
    group = check_group_size(inn, scheme.group_size, name)
    rows = w.transpose(1, 2).reshape(experts * out, inn)  # [E*out, in]: each expert's linear-layout weight
    qw = rtn(rows, bits=scheme.bits, symmetric=scheme.symmetric, group_size=group)
    layer = QuantizedLayer(scheme=scheme, weight=qw, experts=experts)
    x = stats.rows_kept()  # [k, in], the rows routed to any expert: each expert is measured on all of them
    reference = torch.einsum("ki,eio->eko", x, w)  # [E, k, out]
    every = x.repeat(experts, 1)  # [E*k, in], expert e's copy at rows e*k:(e+1)*k
    offs = torch.arange(1, experts + 1, dtype=torch.int32) * x.shape[0]  # [E]
    approx = run_experts(every, layer, expert_buffers(layer, torch.float32), offs)  # [E*k, out]
    layer.report = {
        "scheme": scheme.label(),
        "shape": list(w.shape),
        "experts": experts,
        "inputs": stats.outliers(),
        "weight_scale": summary(qw.scale),
        "weight_sqnr_db": round(sqnr_db(rows, qw.dequantize()), 2),
        "output_sqnr_db": round(sqnr_db(reference.reshape(-1, out), approx), 2),
    }
    return layer


def expert_buffers(layer: QuantizedLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors stored for the experts, by suffix, in ops.grouped_woq's layouts, scales in `dtype`; for
    W8A8 ops.grouped_w8a8's: qweight [E, out, in] int8, scale [E, out] float32."""
    stored = layer.weight.storage()  # the 2-D layout of [E*out, in]
    experts = layer.experts
    qweight, scale, zero = stored["qweight"], stored["scale"].to(dtype), stored.get("zero")
    out = scale.shape[0] // experts
    if layer.scheme.activations == "per_token":  # symmetric per channel: one scale per output row
        scale = stored["scale"].float().reshape(experts, out)
        return {"qweight": qweight.reshape(experts, out, -1).contiguous(), "scale": scale.contiguous()}
    if layer.weight.bits == 4:  # [E, out, G, gs // 2] blocks, scales and zeros [E, out * G]
        groups = scale.shape[1]
        qweight = qweight.reshape(experts, out, groups, -1)
        scale = scale.reshape(experts, -1)
        zero = zero.reshape(experts, -1) if zero is not None else None
    else:  # qweight [E, out, in], scales and zeros [E, out, G]
        qweight = qweight.reshape(experts, out, -1)
        scale = scale.reshape(experts, out, -1)
        zero = zero.reshape(experts, out, -1) if zero is not None else None
    buffers = {"qweight": qweight.contiguous(), "scale": scale.contiguous()}
    if zero is not None:
        buffers["zero"] = zero.contiguous()
    return buffers


def run_experts(
    x: torch.Tensor, layer: QuantizedLayer, stored: dict[str, torch.Tensor], offs: torch.Tensor
) -> torch.Tensor:
    """The quantized experts on rows x [N, in] sorted by expert (offs: cumulative row counts), through
    the op the graph calls, from their stored tensors (`expert_buffers`)."""
    b = {suffix: t.to(x.device) for suffix, t in stored.items()}
    if layer.scheme.activations == "per_token":
        return ops.grouped_w8a8(x, b["qweight"], b["scale"], offs.to(x.device))
    x = x.to(b["scale"].dtype)
    return ops.grouped_woq(x, b["qweight"], b["scale"], b.get("zero"), offs.to(x.device), layer.weight.bits)
