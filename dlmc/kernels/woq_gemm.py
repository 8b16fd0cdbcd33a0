"""Weight-only int8 / int4 GEMM (and GEMV for few rows) with the dequantisation inside the kernel, in the
layouts of dlmc.quant.ops.linear_woq (its module docstring):

    bits 8: qweight [out, in] int8 (uint8 with zero), scale and zero [out, G]
    bits 4: qweight [out, G, gs // 2] uint8, two codes per byte (even column low), scale, zero [out * G]

Both are row-major [out, G] scales and zeros, and the int4 blocks are [out, in // 2] bytes, so one
addressing serves both. Each tile of codes becomes w = (q - zero) * scale in scale's dtype (symmetric
int4 has the implicit zero 8), then the input's dtype, as linear_woq's dequantize_weight; the products
accumulate in float32. So it matches linear_woq up to the rounding of the float32 sums.

With at most GEMV_ROWS rows a tile of tl.dot (16 rows at least) would be mostly padding: the kernel then
multiplies and reduces in registers instead (the decode-time case of one or a few rows per step).
"""

from __future__ import annotations

import torch

from dlmc.errors import DlmcError
from dlmc.kernels.dispatch import LazyKernel, cdiv, dot_settings, next_power_of_2, use_triton
from dlmc.quant.ops import linear_woq_eager

try:
    import triton.language as tl
except ImportError:  # the reference still runs; use_triton says why the kernel cannot
    tl = None

GEMV_ROWS = 4


linear_woq_reference = linear_woq_eager  # the op's own maths: y = x @ dequantize(qweight)^T + bias


@LazyKernel
def _woq_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, G, GS, stride_x, stride_y,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < K
        x = tl.load(x_ptr + rm[:, None] * stride_x + ks[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BM, BK]
        w_ok = k_ok[:, None] & n_ok[None, :]  # [BK, BN]
        if BITS == 4:
            byte = tl.load(q_ptr + rn[None, :] * (K // 2) + (ks // 2)[:, None], mask=w_ok, other=0)  # [BK, BN]
            code = (byte.to(tl.int32) >> ((ks % 2) * 4)[:, None]) & 15
        else:
            code = tl.load(q_ptr + rn[None, :] * K + ks[:, None], mask=w_ok, other=0)  # [BK, BN]
        group = rn[None, :] * G + (ks // GS)[:, None]  # [BK, BN] index into the [out, G] scales
        scale = tl.load(s_ptr + group, mask=w_ok, other=0.0)
        # code - zero in integers: |q| <= 255 is exact in every scale dtype, so this equals the reference's
        # subtraction in scale's dtype
        q = code.to(tl.int32)
        if HAS_ZERO:
            q = q - tl.load(z_ptr + group, mask=w_ok, other=0).to(tl.int32)
        elif BITS == 4:
            q = q - 8
        # the reference's product in scale's dtype: exact in float32 for a 16-bit scale, then rounded once;
        # a float32 scale rounds once either way (and no 16-bit arithmetic runs, which the interpreter gets wrong)
        w = (q.to(tl.float32) * scale.to(tl.float32)).to(scale.dtype).to(x.dtype)  # [BK, BN]
        if USE_DOT:
            if WIDEN:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        else:  # few rows: [BM, BK, 1] x [1, BK, BN] summed over k, in float32
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def linear_woq_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    N, K, G = _check(x, qweight, scale, zero, bias, bits)
    rows = x.reshape(-1, K).contiguous()  # [M, K]
    M = rows.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)  # [M, N]
    if M <= GEMV_ROWS:
        use_dot, block_m, block_n, block_k = False, next_power_of_2(M), 32, 32
    else:
        use_dot, block_m, block_n, block_k = True, 16, 32, 32
    scale = scale.contiguous()
    precision, widen = dot_settings(x.dtype)
    _woq_kernel[(cdiv(M, block_m), cdiv(N, block_n))](
        rows, qweight.contiguous(), scale, scale if zero is None else zero.contiguous(),
        scale if bias is None else bias, y,
        M, N, K, G, K // G, rows.stride(0), y.stride(0),
        BITS=bits, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, USE_DOT=use_dot,
        PRECISION=precision, WIDEN=widen, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.reshape(*x.shape[:-1], N)


def _check(x, qweight, scale, zero, bias, bits) -> tuple[int, int, int]:
    """(out, in, groups) of the stored layout; one line when the tensors do not form it."""
    if bits not in (4, 8):
        raise DlmcError(f"linear_woq.bits: {bits} is not 4 or 8")
    N, K = qweight.shape[0], x.shape[-1]
    if bits == 8:
        if qweight.dim() != 2 or qweight.shape[1] != K or scale.dim() != 2 or scale.shape[0] != N:
            raise DlmcError(f"linear_woq: bits 8 needs qweight [out, {K}] and scale [out, G], got "
                            f"{list(qweight.shape)} and {list(scale.shape)}")
        G = scale.shape[1]
    else:
        if qweight.dim() != 3 or qweight.shape[1] * qweight.shape[2] * 2 != K or scale.shape != (N * qweight.shape[1],):
            raise DlmcError(f"linear_woq: bits 4 needs qweight [out, G, gs // 2] with G * gs = {K} and scale "
                            f"[out * G], got {list(qweight.shape)} and {list(scale.shape)}")
        G = qweight.shape[1]
    if K % G:
        raise DlmcError(f"linear_woq: {G} groups do not divide the {K} input channels")
    if zero is not None and zero.numel() != scale.numel():
        raise DlmcError(f"linear_woq: zero has {zero.numel()} entries, scale {scale.numel()}")
    if bias is not None and bias.shape != (N,):
        raise DlmcError(f"linear_woq: bias {list(bias.shape)} is not [out] = [{N}]")
    return N, K, G


@torch.library.custom_op("dlmc_kernels::linear_woq", mutates_args=())
def linear_woq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """dlmc.quant.ops.linear_woq with the dequantisation fused into the matmul on CUDA."""
    if use_triton(x.device):
        return linear_woq_triton(x, qweight, scale, zero, bias, bits)
    _check(x, qweight, scale, zero, bias, bits)
    return linear_woq_reference(x, qweight, scale, zero, bias, bits)


@linear_woq.register_fake
def _(x, qweight, scale, zero, bias, bits):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
