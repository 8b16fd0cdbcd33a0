"""The one transformer every supported family runs on.

Families differ only in data (ArchConfig, DenoiserSpec) and in their published tensor names, which
the family modules map onto the canonical names used here. Passes therefore find "layer 7's
attention" under the same module path for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlmc.errors import DlmcError
from dlmc.models.moe import MoE, MoEConfig
from dlmc.spec import DenoiserSpec


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    """Rows of the embedding and of the output head."""
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool = False
    out_bias: bool = False
    """Bias on the attention output and MLP projections (LLaDA include_bias)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3 / SDAR / WeDLM-8B)."""
    tie_embeddings: bool = False
    rope_fp32: bool = True
    """Apply RoPE in fp32 and cast back (LLaDA rope_full_precision); otherwise cos/sin are cast to the
    activation dtype first, as Qwen2/Qwen3 do."""
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    fused_qkv: bool = False
    """One [q; k; v] projection (LLaDA2's query_key_value), split by heads after the matmul."""
    rotary_dim: int | None = None
    """Partial RoPE (LLaDA2): rotate only the first rotary_dim dims of each head, with frequencies
    normalised by rotary_dim; None rotates the whole head."""
    moe: MoEConfig | None = None
    """Mixture-of-experts MLP on the layers moe.layers lists; the other layers keep the dense MLP."""

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64, which the parity tests use)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (all families do), cast back, then scale.
        x32 = upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # position_ids: [B, L] int64 -> cos, sin: [B, 1, L, head_dim] in fp32 (fp64 for a fp64 model)
    dtype = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device).to(dtype) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = position_ids[:, None, :, None].to(dtype) * inv_freq  # [B, 1, L, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp32: bool) -> torch.Tensor:
    # x: [B, H, L, D]
    if fp32:
        x32 = upcast(x)
        return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(d, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask):
        # x: [B, L, d]; attn_mask: [B, 1, L, L] bool or None
        cfg = self.cfg
        B, L, _ = x.shape
        if cfg.fused_qkv:  # rows: all q heads, then all k heads, then all v heads
            qkv = self.qkv_proj(x).view(B, L, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
            q, k, v = qkv.split([cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads], dim=2)
        else:
            q = self.q_proj(x).view(B, L, cfg.num_heads, cfg.head_dim)
            k = self.k_proj(x).view(B, L, cfg.num_kv_heads, cfg.head_dim)
            v = self.v_proj(x).view(B, L, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
        q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)
        groups = cfg.num_heads // cfg.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, cfg.num_heads * cfg.head_dim))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, H, L, D]; cos, sin: [B, 1, L, rope_dim]
        rd = self.cfg.rope_dim
        if rd == self.cfg.head_dim:
            return apply_rope(x, cos, sin, self.cfg.rope_fp32)
        return torch.cat([apply_rope(x[..., :rd], cos, sin, self.cfg.rope_fp32), x[..., rd:]], dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.out_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.out_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.out_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: ArchConfig, index: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe is not None and index in cfg.moe.layers:
            self.mlp = MoE(cfg.moe, cfg.hidden_size)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


def attention_mask_for(
    spec: DenoiserSpec, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
) -> torch.Tensor | None:
    """The boolean [B, 1, L, L] mask (True = may attend) for this family, or None for full attention."""
    # attention_mask: [B, L] bool key padding (True = real); position_ids: [B, L] int64
    L = position_ids.shape[1]
    if spec.attention == "bidirectional":
        allowed = None
    elif spec.attention == "causal":
        rows = torch.arange(L, device=position_ids.device)
        allowed = (rows[None, :] <= rows[:, None])[None, None]  # [1, 1, L, L]
    else:
        # Blocks are counted on logical positions so that left padding does not move them.
        block = torch.div(position_ids, spec.block_size, rounding_mode="floor")
        allowed = (block[:, None, None, :] <= block[:, None, :, None])  # [B, 1, L, L]
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :].bool()  # [B, 1, 1, L]
        allowed = keys if allowed is None else allowed & keys
        # A padding query must still see something, or its softmax row turns to NaN.
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=position_ids.device)
        allowed = allowed.expand(position_ids.shape[0], 1, L, L)
    return allowed


def cached_attention_mask(
    attention: str,
    block_size: int,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache_mask: torch.Tensor,
    cache_positions: torch.Tensor,
) -> torch.Tensor:
    """The boolean [B, 1, L, C + L] mask of a step whose queries also attend to C cached keys.

    Keys are [cache ; queries]. Cached keys come before every query in physical order (a causal cache
    holds the committed prefix), so "causal" lets a query see all valid cached keys and the queries up to
    itself; block-causal compares blocks of logical positions, wherever the key sits. With C masked-out
    cached keys this is exactly `attention_mask_for` of the same queries."""
    # attention_mask, position_ids: [B, L]; cache_mask, cache_positions: [B, C]
    B, L = position_ids.shape
    C = cache_mask.shape[1]
    device = position_ids.device
    keys = torch.cat([cache_mask, attention_mask], dim=1).bool()[:, None, None, :]  # [B, 1, 1, C + L]
    if attention == "bidirectional":
        allowed = keys
    elif attention == "causal":
        rows = torch.arange(L, device=device)
        cols = torch.arange(C + L, device=device)
        allowed = (cols[None, :] <= rows[:, None] + C)[None, None] & keys  # [B, 1, L, C + L]
    else:
        key_blocks = torch.div(torch.cat([cache_positions, position_ids], dim=1), block_size, rounding_mode="floor")
        query_blocks = torch.div(position_ids, block_size, rounding_mode="floor")
        allowed = (key_blocks[:, None, None, :] <= query_blocks[:, None, :, None]) & keys  # [B, 1, L, C + L]
    # A padding query must still see something, or its softmax row turns to NaN.
    itself = torch.cat(
        [torch.zeros(L, C, dtype=torch.bool, device=device), torch.eye(L, dtype=torch.bool, device=device)], dim=1
    )  # [L, C + L]
    return (allowed | itself).expand(B, 1, L, C + L)


class DiffusionLM(nn.Module):
    """One denoising forward: token ids in, raw (never shifted) logits out."""

    def __init__(self, arch: ArchConfig, spec: DenoiserSpec):
        super().__init__()
        self.arch = arch
        self.spec = spec
        self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Layer(arch, n) for n in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        if not arch.tie_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # input_ids: [B, L] int64 -> logits: [B, L, V]
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        x = self.embed(input_ids)
        if self.arch.embed_scale != 1.0:
            x = x * self.arch.embed_scale
        cos, sin = rope_cos_sin(position_ids, self.arch.rope_dim, self.arch.rope_theta, x.dtype)
        if attention_mask is None:
            # Always hand SDPA a mask: the captured step always has one, and on CUDA a masked and an
            # unmasked call run different kernels (flash vs efficient/math), so the reference and the
            # compiled step would round differently and an exact recipe could change tokens.
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)  # [B, L] bool
        mask = attention_mask_for(self.spec, attention_mask, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = self.norm(x)
        head = self.embed.weight if self.arch.tie_embeddings else self.lm_head.weight
        logits = F.linear(x, head)
        if self.arch.logit_scale != 1.0:
            logits = logits * self.arch.logit_scale
        return logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def default_head_dim(hidden_size: int, num_heads: int, where) -> int:
    if hidden_size % num_heads:
        raise DlmcError(f"{where}: hidden size {hidden_size} is not divisible by {num_heads} heads")
    return hidden_size // num_heads


