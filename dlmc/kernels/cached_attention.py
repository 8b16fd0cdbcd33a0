"""Attention of fresh queries over [cache ; fresh] keys (a cached step's attention layer, see
dlmc.passes.kv_cache), flash-style: the keys are read where they lie, cache first, then the fresh ones,
one tile at a time with an online softmax, so neither the concatenated K/V nor the repeated grouped-query
heads nor the [L, C + L] scores are ever written.

    cached_attention(query [B, H, L, D], key, value [B, Hkv, L, D], cache_key, cache_value [B, Hkv, C, D],
                     key_mask [B, C + L] bool) -> [B, H, L, D]

Query head h reads kv head h // (H / Hkv) (repeat_interleave's order). A query attends to the keys its
row of key_mask allows and always to its own fresh key, which is the bidirectional mask of
`cached_attention_mask` (a padding query must see something, or its softmax is NaN). The cache may be a
view into the [layers, B, Hkv, C, D] buffer (`cache_keys[layer]`): any strides with a unit last one.
Scores, softmax statistics and the weighted sum are float32; the scale is 1 / sqrt(D), as SDPA's.
"""

from __future__ import annotations

import math

import torch

from dlmc.errors import DlmcError
from dlmc.kernels.dispatch import LazyKernel, cdiv, dot_settings, next_power_of_2, use_triton
from dlmc.models.transformer import cached_attention_mask

try:
    import triton.language as tl
except ImportError:  # the reference still runs; use_triton says why the kernel cannot
    tl = None


def cached_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_key: torch.Tensor,
    cache_value: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """What the cached step computes: concatenated, repeated K/V and SDPA under the bidirectional mask."""
    B, H, L, _ = query.shape
    C, groups = cache_key.shape[2], H // key.shape[1]
    positions = torch.zeros(B, C + L, dtype=torch.int64, device=query.device)  # unused by a bidirectional mask
    mask = cached_attention_mask("bidirectional", 1, key_mask[:, C:], positions[:, C:], key_mask[:, :C],
                                 positions[:, :C])  # [B, 1, L, C + L]
    keys = torch.cat([cache_key, key], dim=2).repeat_interleave(groups, dim=1)  # [B, H, C + L, D]
    values = torch.cat([cache_value, value], dim=2).repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask)


@LazyKernel
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr, mask_ptr, o_ptr,
    H, GROUPS, L, C, D, scale,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
    sck_b, sck_h, sck_c, scv_b, scv_h, scv_c, sm_b, so_b, so_h, so_l,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kv = h // GROUPS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] fresh query rows
    row_ok = rows < L
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + ds[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
    if WIDEN:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, C + L, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # [BN] key index in [cache ; fresh]
        in_cache = cols < C
        in_fresh = (cols >= C) & (cols < C + L)
        fresh = cols - C
        # a tile may straddle the two sources: each key comes from one load, the other reads nothing (0)
        kt = (tl.load(ck_ptr + b * sck_b + kv * sck_h + cols[None, :] * sck_c + ds[:, None],
                      mask=in_cache[None, :] & d_ok[:, None], other=0.0)
              + tl.load(k_ptr + b * sk_b + kv * sk_h + fresh[None, :] * sk_l + ds[:, None],
                        mask=in_fresh[None, :] & d_ok[:, None], other=0.0))  # [BD, BN]
        if WIDEN:
            kt = kt.to(tl.float32)
        scores = tl.dot(q, kt, input_precision=PRECISION) * scale  # [BM, BN] float32
        keep = tl.load(mask_ptr + b * sm_b + cols, mask=cols < C + L, other=0) != 0  # [BN]
        allowed = (keep[None, :] | (cols[None, :] == rows[:, None] + C)) & (cols < C + L)[None, :]
        scores = tl.where(allowed, scores, float("-inf"))
        new_m = tl.maximum(m, tl.max(scores, axis=1))  # [BM]
        base = tl.where(new_m == float("-inf"), 0.0, new_m)  # rows with nothing allowed yet: no NaN
        alpha = tl.exp(m - base)
        p = tl.exp(scores - base[:, None])  # [BM, BN], 0 where masked
        total = total * alpha + tl.sum(p, axis=1)
        vt = (tl.load(cv_ptr + b * scv_b + kv * scv_h + cols[:, None] * scv_c + ds[None, :],
                      mask=in_cache[:, None] & d_ok[None, :], other=0.0)
              + tl.load(v_ptr + b * sv_b + kv * sv_h + fresh[:, None] * sv_l + ds[None, :],
                        mask=in_fresh[:, None] & d_ok[None, :], other=0.0))  # [BN, BD]
        if WIDEN:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m = new_m
    # every real row allows its own key (total > 0); padding rows past L may have none, and are not stored
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + rows[:, None] * so_l + ds[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def cached_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_key: torch.Tensor,
    cache_value: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    _check(query, key, value, cache_key, cache_value, key_mask)
    query, key, value, cache_key, cache_value = (_unit_last(t) for t in (query, key, value, cache_key, cache_value))
    B, H, L, D = query.shape
    C = cache_key.shape[2]
    mask = key_mask.to(torch.uint8).contiguous()  # [B, C + L]
    out = torch.empty_like(query, memory_format=torch.contiguous_format)  # [B, H, L, D]
    precision, widen = dot_settings(query.dtype)
    block_m, block_n, block_d = 16, 16, max(16, next_power_of_2(D))  # tl.dot needs tiles of >= 16
    _attention_kernel[(cdiv(L, block_m), B * H)](
        query, key, value, cache_key, cache_value, mask, out,
        H, H // key.shape[1], L, C, D, 1 / math.sqrt(D),
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
        *cache_key.stride()[:3], *cache_value.stride()[:3], mask.stride(0), *out.stride()[:3],
        PRECISION=precision, WIDEN=widen, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(query, key, value, cache_key, cache_value, key_mask) -> None:
    if query.dim() != 4 or key.dim() != 4 or cache_key.dim() != 4:
        raise DlmcError("cached_attention: query, key and cache_key must be [batch, heads, length, head_dim]")
    B, H, L, D = query.shape
    kv_heads, C = key.shape[1], cache_key.shape[2]
    if key.shape != (B, kv_heads, L, D) or value.shape != key.shape:
        raise DlmcError(f"cached_attention: key and value must be [{B}, kv_heads, {L}, {D}], got "
                        f"{list(key.shape)} and {list(value.shape)}")
    if cache_key.shape != (B, kv_heads, C, D) or cache_value.shape != cache_key.shape:
        raise DlmcError(f"cached_attention: cache_key and cache_value must be [{B}, {kv_heads}, cache, {D}], got "
                        f"{list(cache_key.shape)} and {list(cache_value.shape)}")
    if H % kv_heads:
        raise DlmcError(f"cached_attention: {kv_heads} kv heads do not divide {H} query heads")
    if key_mask.shape != (B, C + L) or key_mask.dtype != torch.bool:
        raise DlmcError(f"cached_attention: key_mask must be bool [{B}, {C + L}] (cache + fresh), got "
                        f"{key_mask.dtype} {list(key_mask.shape)}")


@torch.library.custom_op("dlmc_kernels::cached_attention", mutates_args=())
def cached_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_key: torch.Tensor,
    cache_value: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Attention over [cache ; fresh] keys under a key mask (see the module doc)."""
    if use_triton(query.device):
        return cached_attention_triton(query, key, value, cache_key, cache_value, key_mask)
    _check(query, key, value, cache_key, cache_value, key_mask)
    return cached_attention_reference(query, key, value, cache_key, cache_value, key_mask).contiguous()


@cached_attention.register_fake
def _(query, key, value, cache_key, cache_value, key_mask):
    return torch.empty_like(query, memory_format=torch.contiguous_format)
