"""Quantized-weight formats: integer codes plus per-group scales (and zero points when asymmetric).

A weight [out, in] is split along `in` into groups of `group_size` columns (per-channel = one group of
`in`). Symmetric codes are signed, q in [-2^(b-1), 2^(b-1)-1] with scale = absmax / (2^(b-1)-1);
asymmetric codes are unsigned, q in [0, 2^b-1] with w ~ (q - zero) * scale.

Storage (what the artifact holds):
  int8 symmetric   q: int8  [out, in]          scale [out, G]
  int8 asymmetric  q: uint8 [out, in]          scale [out, G], zero uint8 [out, G]
  int4 (either)    q: uint8 [out, in // 2]     scale [out, G], zero uint8 [out, G] (asymmetric only)
int4 codes are stored unsigned (symmetric codes shifted by +8, i.e. an implicit zero point of 8),
two per byte, the even column in the low nibble: the layout ONNX Runtime's MatMulNBits reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError

BITS = (4, 8)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes (unpacked, one per weight element) and the parameters that map them back."""

    codes: torch.Tensor
    """[out, in] int16 holding the integer code of each element (signed if symmetric)."""
    scale: torch.Tensor
    """[out, G] float32."""
    zero: torch.Tensor | None
    """[out, G] int16 zero points (asymmetric), None when symmetric."""
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group_size)

    def storage(self) -> dict[str, torch.Tensor]:
        """The tensors written to the artifact: packed codes, scales, zero points."""
        return to_storage(self)

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def check_group_size(in_features: int, group_size: int | None, layer: str) -> int:
    """The effective group size (None = per channel); one clear line when it does not fit the layer."""
    if group_size is None:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise DlmcError(
            f"quantize.group_size: {group_size} does not divide the {in_features} input channels of {layer}"
        )
    return group_size


def group_params(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale [out, G] (and zero [out, G]) for w [out, in] from each group's range (round to nearest)."""
    out, inn = w.shape
    g = w.float().reshape(out, inn // group_size, group_size)  # [out, G, gs]
    lo, hi = qrange(bits, symmetric)
    if symmetric:
        scale = g.abs().amax(-1) / hi  # [out, G]
        return scale.clamp(min=1e-10), None
    wmin = g.amin(-1).clamp(max=0)  # the range always holds 0, so zeros stay exact
    wmax = g.amax(-1).clamp(min=0)
    scale = ((wmax - wmin) / (hi - lo)).clamp(min=1e-10)  # [out, G]
    zero = torch.round(-wmin / scale).clamp(lo, hi).to(torch.int16)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Codes [out, in] int16 of w under given per-group parameters."""
    out, inn = w.shape
    lo, hi = qrange(bits, zero is None)
    g = w.float().reshape(out, inn // group_size, group_size)  # [out, G, gs]
    q = torch.round(g / scale.unsqueeze(-1))
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    return q.clamp(lo, hi).to(torch.int16).reshape(out, inn)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    out, inn = codes.shape
    q = codes.float().reshape(out, inn // group_size, group_size)  # [out, G, gs]
    if zero is not None:
        q = q - zero.float().unsqueeze(-1)
    return (q * scale.float().unsqueeze(-1)).reshape(out, inn)


def rtn(w: torch.Tensor, bits: int, symmetric: bool, group_size: int) -> QuantizedWeight:
    """Round-to-nearest: the baseline every other method is measured against."""
    if bits not in BITS:
        raise ValueError(f"bits: {bits} is not one of {BITS}")
    scale, zero = group_params(w, bits, symmetric, group_size)
    return QuantizedWeight(quantize_codes(w, scale, zero, bits, group_size), scale, zero, bits, group_size)


def to_storage(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"scale": qw.scale.float().contiguous()}
    if qw.bits == 8:
        out["qweight"] = qw.codes.to(torch.int8 if qw.symmetric else torch.uint8).contiguous()
    else:
        unsigned = qw.codes + 8 if qw.symmetric else qw.codes  # [out, in] in [0, 15]
        out["qweight"] = pack_int4(unsigned)
    if qw.zero is not None:
        out["zero"] = qw.zero.to(torch.uint8).contiguous()
    return out


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """[out, in] values in [0, 15] -> [out, in // 2] uint8, even column in the low nibble."""
    if u.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of columns")
    u = u.to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in // 2] uint8 -> [out, in] uint8 in [0, 15]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20 log10(|ref| / |ref - approx|) in dB (inf when equal)."""
    ref = reference.float()
    noise = (ref - approx.float()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))
