"""One linear layer quantized: the numerics behind the quantize pass, apart from the graph edit.

`quantize_layer` turns a float weight [out, in] and its calibration statistics into integer codes and
scales under a Scheme (RTN, AWQ or GPTQ; SmoothQuant scales or a Hadamard rotation first), with a
report of what rounding cost (weight and output SQNR). `buffers` lays the result out as the tensors the
graph stores and `dlmc.quant.ops` reads; `run_layer` runs those ops eagerly, for calibration and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dlmc.quant import ops
from dlmc.quant.awq import awq
from dlmc.quant.calibration import LayerStats
from dlmc.quant.formats import QuantizedWeight, check_group_size, rtn, sqnr_db
from dlmc.quant.gptq import gptq
from dlmc.quant.hadamard import kronecker_factors, rotate
from dlmc.quant.scheme import Scheme
from dlmc.quant.smoothquant import smooth_scales


@dataclass
class QuantizedLayer:
    """What replaces one linear: its buffers (name suffix -> tensor) and how its input is transformed."""

    scheme: Scheme
    weight: QuantizedWeight
    inv_scale: torch.Tensor | None = None  # [in] x is multiplied by it (AWQ, SmoothQuant)
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # x -> x @ hadamard(in), as (A, B) factors
    act_scale: torch.Tensor | None = None  # [] static per-tensor activation scale
    experts: int | None = None  # stacked MoE experts (dlmc.quant.experts): weight holds their E * out rows
    report: dict[str, Any] = field(default_factory=dict)


def quantize_layer(name: str, w: torch.Tensor, scheme: Scheme, stats: LayerStats) -> QuantizedLayer:
    """Quantize one weight [out, in] under `scheme` from its input statistics."""
    w = w.detach().float().cpu()  # quantization runs on the host; buffers go back to the weight's device
    inn = w.shape[1]
    group = check_group_size(inn, scheme.group_size, name)
    layer = QuantizedLayer(scheme=scheme, weight=None)  # type: ignore[arg-type]
    wt = w
    x = stats.rows_kept()  # [k, in] calibration inputs, for AWQ and the SQNR
    extra: dict[str, Any] = {}
    if scheme.outliers == "smoothquant":
        s = smooth_scales(stats.absmax, w, scheme.smooth_alpha)  # [in]
        layer.inv_scale, wt = 1 / s, w * s
        extra["smooth_scale"] = summary(s)
    elif scheme.outliers == "hadamard":
        layer.rotation = kronecker_factors(inn)
        wt = rotate(w, *layer.rotation)  # w R: each row rotated
        extra["rotation"] = f"hadamard {inn}"

    common = {"bits": scheme.bits, "symmetric": scheme.symmetric, "group_size": group}
    if scheme.method == "awq":
        qw, s, alpha = awq(w, x, **common, grid=scheme.awq_grid)
        layer.inv_scale = 1 / s
        extra |= {"awq_alpha": alpha, "awq_scale": summary(s)}
    elif scheme.method == "gptq":
        h = stats.hessian()
        if layer.inv_scale is not None:
            h = h * layer.inv_scale[:, None] * layer.inv_scale[None, :]
        if layer.rotation is not None:  # R^T H R, H symmetric
            h = rotate(rotate(h, *layer.rotation).T, *layer.rotation).T
        qw = gptq(wt, h, **common, damp=scheme.gptq_damp, act_order=scheme.gptq_act_order,
                  block_size=scheme.gptq_block, layer=name)
    else:
        qw = rtn(wt, **common)
    layer.weight = qw

    xt = transform_input(x, layer)
    if scheme.activations == "per_tensor":
        if layer.rotation is None and layer.inv_scale is None:
            amax = stats.absmax.max()
        elif layer.rotation is None:  # exact: max_j absmax_j / s_j
            amax = (stats.absmax * layer.inv_scale).max()
        else:  # after rotation only the kept rows are known
            amax = xt.abs().max()
        layer.act_scale = (amax.clamp(min=1e-8) / ops.INT8_MAX).reshape(())
        extra["act_scale"] = float(layer.act_scale)
    reference = x @ w.T  # [k, out]
    layer.report = {
        "scheme": scheme.label(),
        "shape": list(w.shape),
        "inputs": stats.outliers(),
        "weight_scale": summary(qw.scale),
        **extra,
        "weight_sqnr_db": round(sqnr_db(wt, qw.dequantize()), 2),
        "output_sqnr_db": round(sqnr_db(reference, run_layer(xt, layer, buffers(layer, torch.float32))), 2),
    }
    return layer


def transform_input(x: torch.Tensor, layer: QuantizedLayer) -> torch.Tensor:
    if layer.inv_scale is not None:
        x = x * layer.inv_scale.to(x.device, x.dtype)
    if layer.rotation is not None:
        x = rotate(x, *(f.to(x.device, x.dtype) for f in layer.rotation))
    return x


def buffers(layer: QuantizedLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors stored for the layer, by suffix, in the layouts dlmc.quant.ops reads; scales in the
    weight's dtype."""
    stored = layer.weight.storage()
    qweight, scale, zero = stored["qweight"], stored["scale"].to(dtype), stored.get("zero")
    out_features, groups = scale.shape
    if layer.weight.bits == 4:  # [out, G, gs // 2] blocks, scales and zeros flat [out * G]
        qweight = qweight.reshape(out_features, groups, -1)
        scale, zero = scale.reshape(-1), (zero.reshape(-1) if zero is not None else None)
    out = {"qweight": qweight, "scale": scale}
    if zero is not None:
        out["zero"] = zero
    if layer.inv_scale is not None:
        out["inv_scale"] = layer.inv_scale.to(dtype)
    if layer.rotation is not None:
        out["rotation_a"], out["rotation_b"] = (f.to(dtype) for f in layer.rotation)
    if layer.act_scale is not None:
        out["act_scale"] = layer.act_scale.to(dtype)
    return out


def run_layer(
    x: torch.Tensor, layer: QuantizedLayer, stored: dict[str, torch.Tensor], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The quantized layer on an already transformed input, through the same ops the graph calls, from
    its stored tensors (`buffers(layer, dtype)`)."""
    b = {suffix: t.to(x.device) for suffix, t in stored.items()}
    x = x.to(b["scale"].dtype)
    if layer.scheme.activations != "none":
        return ops.linear_w8a8(x, b["qweight"], b["scale"], bias, b.get("act_scale"))
    return ops.linear_woq(x, b["qweight"], b["scale"], b.get("zero"), bias, layer.weight.bits)


def summary(t: torch.Tensor) -> dict[str, float]:
    t = t.float()
    return {"min": float(f"{t.min():.4g}"), "max": float(f"{t.max():.4g}"), "mean": float(f"{t.mean():.4g}")}
