"""Fused unmasking head: hidden rows x head weight -> per row the arg-max token, its softmax probability
(the confidence), the top-1 minus top-2 logit (margin) and the entropy of the softmax, streaming over
the vocabulary in tiles with an online max / sum-exp, so the [R, V] logits never reach memory.

All four come from three running values per row over the tiles seen so far: m (max logit), s = sum
exp(z - m) and t = sum exp(z - m) (z - m). Then confidence = 1 / s (the arg-max's exp(m - m) / s) and
entropy = -sum p log p = log s - t / s. A new tile maximum m' rescales s by exp(m - m') and t to
exp(m - m') (t + (m - m') s). Everything is float32: the logits (float32 accumulation over d, not
rounded to the hidden dtype) and the softmax statistics.

    unmask_head(hidden [R, d], weight [V, d], bias [V]?) -> tokens [R] int64, confidence, margin,
                                                            entropy [R] float32
Ties go to the lowest token id, as torch.argmax.
"""

from __future__ import annotations

import torch

from dlmc.errors import DlmcError
from dlmc.kernels.dispatch import LazyKernel, cdiv, dot_settings, next_power_of_2, use_triton

try:
    import triton.language as tl
except ImportError:  # the reference still runs; use_triton says why the kernel cannot
    tl = None


def unmask_head_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same maths through the [R, V] logits, in float32."""
    logits = hidden.float() @ weight.float().T  # [R, V]
    if bias is not None:
        logits = logits + bias.float()
    tokens = logits.argmax(-1)  # [R]
    log_p = torch.log_softmax(logits, dim=-1)  # [R, V]
    confidence = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).exp()  # [R]
    top2 = logits.topk(2, dim=-1).values  # [R, 2]
    entropy = -torch.where(log_p > float("-inf"), log_p.exp() * log_p, 0.0).sum(-1)  # [R]
    return tokens, confidence, top2[:, 0] - top2[:, 1], entropy


@LazyKernel
def _unmask_head_kernel(
    h_ptr, w_ptr, b_ptr, tokens_ptr, confidence_ptr, margin_ptr, entropy_ptr,
    R, V, D, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    row_ok = rows < R
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running max logit
    second = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running second-largest logit
    best = tl.zeros([BLOCK_R], tl.int64)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # [BV]
        col_ok = cols < V
        z = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)  # [BD]
            d_ok = ds < D
            h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)  # [BR, BD]
            w = tl.load(w_ptr + cols[None, :] * stride_w + ds[:, None], mask=col_ok[None, :] & d_ok[:, None],
                        other=0.0)  # [BD, BV]
            if WIDEN:
                h, w = h.to(tl.float32), w.to(tl.float32)
            z = tl.dot(h, w, z, input_precision=PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], z, float("-inf"))  # [BR, BV]
        tile_max = tl.max(z, axis=1)  # [BR]
        tile_arg = tl.argmax(z, axis=1)  # [BR] first index of the maximum
        # the second largest of the tile: every entry but the arg-max (an equal logit counts: margin 0)
        tile_second = tl.max(tl.where(tl.arange(0, BLOCK_V)[None, :] == tile_arg[:, None], float("-inf"), z), axis=1)
        second = tl.maximum(tl.maximum(second, tile_second), tl.minimum(m, tile_max))
        best = tl.where(tile_max > m, v0 + tile_arg.to(tl.int64), best)  # strictly: earlier tiles win ties
        new_m = tl.maximum(m, tile_max)  # finite: every tile holds a real column
        alpha = tl.exp(m - new_m)  # 0 on the first tile
        shift = tl.where(s > 0, m - new_m, 0.0)  # (m - m') s, without -inf * 0 on the first tile
        centred = tl.where(col_ok[None, :], z - new_m[:, None], 0.0)  # [BR, BV]
        p = tl.exp(centred) * col_ok[None, :]  # [BR, BV]
        t = alpha * (t + shift * s) + tl.sum(p * centred, axis=1)
        s = alpha * s + tl.sum(p, axis=1)
        m = new_m
    tl.store(tokens_ptr + rows, best, mask=row_ok)
    tl.store(confidence_ptr + rows, 1.0 / s, mask=row_ok)
    tl.store(margin_ptr + rows, m - second, mask=row_ok)
    tl.store(entropy_ptr + rows, tl.log(s) - t / s, mask=row_ok)


def unmask_head_triton(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(hidden, weight, bias)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    (R, D), V = hidden.shape, weight.shape[0]
    tokens = torch.empty(R, dtype=torch.int64, device=hidden.device)
    confidence, margin, entropy = (torch.empty(R, dtype=torch.float32, device=hidden.device) for _ in range(3))
    precision, widen = dot_settings(hidden.dtype)
    block_r, block_v, block_d = 16, 64, min(64, max(16, next_power_of_2(D)))  # tl.dot needs tiles of >= 16
    grid = (cdiv(R, block_r),)
    _unmask_head_kernel[grid](
        hidden, weight, hidden if bias is None else bias, tokens, confidence, margin, entropy,
        R, V, D, hidden.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, PRECISION=precision, WIDEN=widen,
        BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_D=block_d,
    )
    return tokens, confidence, margin, entropy


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise DlmcError(f"unmask_head: hidden [R, d] and weight [V, d] do not match ({list(hidden.shape)} and "
                        f"{list(weight.shape)})")
    if weight.shape[0] < 2:
        raise DlmcError("unmask_head: the vocabulary needs two tokens or more (the margin reads the top two)")
    if hidden.dtype != weight.dtype:
        raise DlmcError(f"unmask_head: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise DlmcError(f"unmask_head: bias {list(bias.shape)} is not [V] = [{weight.shape[0]}]")


@torch.library.custom_op("dlmc_kernels::unmask_head", mutates_args=())
def unmask_head(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token, confidence, margin and entropy of each hidden row under the head (see the module doc)."""
    if use_triton(hidden.device):
        return unmask_head_triton(hidden, weight, bias)
    _check(hidden, weight, bias)
    return unmask_head_reference(hidden, weight, bias)


@unmask_head.register_fake
def _(hidden, weight, bias=None):
    R = hidden.shape[0]
    f32 = (hidden.new_empty(R, dtype=torch.float32) for _ in range(3))
    return (hidden.new_empty(R, dtype=torch.int64), *f32)
