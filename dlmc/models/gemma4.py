"""The Gemma-4 MoE layers DiffusionGemma runs twice (a causal encoder filling a K/V cache, a bidirectional
decoder over [cache ; canvas]).

What differs from dlmc.models.transformer, and why it is its own module: two attention geometries (sliding
layers with their own heads and a K/V projection; full-attention layers with wider heads whose V is the K
projection), a scale-free V norm and attention scale 1.0 (QK-norm does the scaling), proportional RoPE on
full layers, RMSNorm that multiplies the plain weight in fp32, and a dense MLP beside a 128-expert MoE whose
router reads the un-normalised residual and carries a per-expert scale. A layer has one `layer_scalar` per
mode, because the published checkpoint stores the encoder's and the decoder's separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dlmc.models.grouped import grouped_mm
from dlmc.models.moe import RoutedExperts, grouped_experts, tiled_experts

LayerType = Literal["sliding_attention", "full_attention"]
LAYER_TYPES: tuple[str, ...] = ("sliding_attention", "full_attention")
TILE = 8
"""Rows per tile of the experts' tiled form (a speed setting only)."""


@dataclass(frozen=True, kw_only=True)
class Gemma4Config:
    """The text backbone. Per-layer tuples hold the attention geometry, which differs by layer type.
    Messages name the published text_config fields."""

    hidden_size: int
    vocab_size: int
    layer_types: tuple[str, ...]
    num_heads: int
    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    intermediate_size: int
    """Width of the always-on dense MLP and of the self-conditioning MLP."""
    num_experts: int
    top_k: int
    expert_size: int
    rms_norm_eps: float
    sliding_window: int
    rope_theta: dict[str, float] = field(default_factory=dict)
    """Per layer type."""
    rope_fraction: dict[str, float] = field(default_factory=dict)
    """Per layer type: the share of each head's frequencies that are non-zero (proportional RoPE)."""
    softcap: float | None = 30.0
    canvas_length: int = 256

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def __post_init__(self) -> None:
        n = len(self.layer_types)
        bad = next((t for t in self.layer_types if t not in LAYER_TYPES), None)
        if bad is not None:
            raise ValueError(f"'layer_types' holds '{bad}' (supported: {', '.join(LAYER_TYPES)})")
        if len(self.head_dims) != n or len(self.kv_heads) != n:
            raise ValueError("per-layer 'head_dim' / 'num_key_value_heads' do not cover every layer")
        for i, (d, h) in enumerate(zip(self.head_dims, self.kv_heads, strict=True)):
            if d % 2 or d < 2:
                raise ValueError(f"layer {i}: 'head_dim' {d} must be even")
            if h < 1 or self.num_heads % h:
                raise ValueError(f"layer {i}: 'num_key_value_heads' {h} must divide 'num_attention_heads'")
        if self.sliding_window < 1:
            raise ValueError(f"'sliding_window' must be >= 1, got {self.sliding_window}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"'top_k_experts' ({self.top_k}) must be in 1..'num_experts' ({self.num_experts})")
        if self.canvas_length < 1:
            raise ValueError(f"'canvas_length' must be >= 1, got {self.canvas_length}")
        for kind in set(self.layer_types):
            if kind not in self.rope_theta:
                raise ValueError(f"'rope_parameters' has no entry for '{kind}'")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64, which the parity tests use)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class GemmaRMSNorm(nn.Module):
    """x / rms(x) in fp32, times the plain weight (not 1 + weight) still in fp32, cast back. `scale=False` is
    the weightless instance (V norm, router norm, the self-conditioning output norm)."""

    def __init__(self, dim: int, eps: float, scale: bool = True):
        super().__init__()
        self.eps = eps
        if scale:
            self.weight = nn.Parameter(torch.ones(dim))
        else:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x32 = x32 * _upcast(self.weight)
        return x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, fraction: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE over the whole head with only the first int(fraction * head_dim // 2) frequencies
    non-zero, the exponent normalised by the full head_dim (proportional RoPE; fraction 1 is the default
    RoPE). The zero frequencies leave their pairs (j, j + head_dim/2) unrotated."""
    # positions: [B, L] int64 -> cos, sin: [B, 1, L, head_dim] in `dtype`
    compute = torch.promote_types(dtype, torch.float32)
    angles_n = int(fraction * head_dim // 2)
    exponents = torch.arange(0, 2 * angles_n, 2, device=positions.device).to(compute) / head_dim
    zero = torch.zeros(head_dim // 2 - angles_n, dtype=compute, device=positions.device)
    inv_freq = torch.cat([1.0 / theta**exponents, zero])  # not an in-place write: a captured graph keeps none
    angles = positions[:, None, :, None].to(compute) * inv_freq  # [B, 1, L, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Gemma4Attention(nn.Module):
    """Sliding layers: q/k/v projections. Full layers: no v_proj, V is the raw K projection. Both: per-head
    q/k norm, scale-free v norm, RoPE on q and k, attention scale 1.0."""

    def __init__(self, cfg: Gemma4Config, index: int):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads[index], cfg.head_dims[index]
        self.k_is_v = cfg.layer_types[index] == "full_attention"
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        if not self.k_is_v:
            self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, scale=False)

    def forward(self, x, cos, sin, past_k, past_v, mask):
        """x [B, L, d]; cos, sin [B, 1, L, D]; past_k, past_v [B, Hkv, C, D]; mask [B, 1, L, C + L] bool.
        Returns the output [B, L, d] and this call's k, v [B, Hkv, L, D] (what a cache keeps)."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.num_heads, self.head_dim)).transpose(1, 2)
        k_raw = self.k_proj(x).view(B, L, self.kv_heads, self.head_dim)
        v = k_raw if self.k_is_v else self.v_proj(x).view(B, L, self.kv_heads, self.head_dim)
        k = self.k_norm(k_raw).transpose(1, 2)  # [B, Hkv, L, D]
        v = self.v_norm(v).transpose(1, 2)  # [B, Hkv, L, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, Hkv, C + L, D]
        # enable_gqa, not repeat_interleave: torch.export cannot prove the latter's strides for a dynamic length
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0, enable_gqa=True)  # [B,H,L,D]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), k, v



class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)): the dense MLP and the self-conditioning MLP."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma4Router(nn.Module):
    """Reads the un-normalised residual: proj(rms(h) * scale / sqrt(d)), softmax in fp32, top-k,
    renormalised, times the chosen experts' per_expert_scale."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.top_k = cfg.top_k
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.root = cfg.hidden_size**-0.5

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # h: [T, d] -> weights [T, k] (>= fp32), idx [T, k] int64
        z = self.norm(h) * self.scale * self.root
        probs = _upcast(self.proj(z)).softmax(-1)  # [T, E]
        weights, idx = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * _upcast(self.per_expert_scale)[idx], idx


class Gemma4Experts(RoutedExperts):
    """Stacked experts as published: gate_up_proj [E, 2F, d] (gate rows first), down_proj [E, d, F]. They
    run in the form set_experts_form chose (dlmc.models.moe): grouped (torch.ops.dlmc.grouped_mm reads the
    published [out, in] matrices in place, as transposed views) or tiled (standard ops, for ONNX). `loop` is
    the per-expert reference, which torch.export cannot capture (data-dependent expert ids)."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        E, f, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # x: [T, d]; weights, idx: [T, k] -> [T, d]
        if self.form == "grouped":
            outputs = grouped_experts(x, idx, self.num_experts, self._grouped_mlp)  # [T, k, d]
        else:
            outputs = tiled_experts(x, idx, self.num_experts, TILE, self._tiled_mlp)  # [T, k, d]
        return (outputs * weights.to(x.dtype)[..., None]).sum(1)

    def _grouped_mlp(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        # rows: [N, d] sorted by expert -> [N, d]
        gate, up = grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs).chunk(2, dim=-1)  # [N, F] each
        return grouped_mm(F.gelu(gate, approximate="tanh") * up, self.down_proj.transpose(1, 2), offs)

    def _tiled_mlp(self, packed: torch.Tensor, tile_expert: torch.Tensor) -> torch.Tensor:
        # packed: [tiles, R, d] -> [tiles, R, d]
        gate, up = torch.bmm(packed, self.gate_up_proj[tile_expert].transpose(1, 2)).chunk(2, dim=-1)
        return torch.bmm(F.gelu(gate, approximate="tanh") * up, self.down_proj[tile_expert].transpose(1, 2))

    def loop(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The reference: each expert on the tokens routed to it. x [T, d]; weights, idx [T, k] -> [T, d]."""
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            token, slot = (idx == e).nonzero(as_tuple=True)  # [n], [n]
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, F] each
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])  # [n, d]
            out.index_add_(0, token, y * weights[token, slot, None].to(x.dtype))
        return out


class Gemma4Layer(nn.Module):
    def __init__(self, cfg: Gemma4Config, index: int):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = Gemma4Attention(cfg, index)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.mlp = GatedMLP(d, cfg.intermediate_size)
        self.post_feedforward_layernorm_1 = GemmaRMSNorm(d, eps)
        self.router = Gemma4Router(cfg)
        self.pre_feedforward_layernorm_2 = GemmaRMSNorm(d, eps)
        self.experts = Gemma4Experts(cfg)
        self.post_feedforward_layernorm_2 = GemmaRMSNorm(d, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))
        """The decoder's residual scalar."""
        self.encoder_layer_scalar = nn.Parameter(torch.ones(1))
        """The encoder's (published under model.encoder.language_model.layers.N.layer_scalar)."""

    def forward(self, h, cos, sin, past_k, past_v, mask, encoder: bool):
        # h: [B, L, d] -> ([B, L, d], k, v of this call)
        a, k, v = self.self_attn(self.input_layernorm(h), cos, sin, past_k, past_v, mask)
        h = h + self.post_attention_layernorm(a)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(-1, h.shape[-1])  # [T, d]
        weights, idx = self.router(flat)  # the router reads the residual itself, not a normed copy
        routed = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx).view_as(h)
        h = h + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(routed))
        return h * (self.encoder_layer_scalar if encoder else self.layer_scalar), k, v
