"""How much device memory a model needs under a quantization scheme: weights plus KV cache, computed
from the architecture (not guessed), for sizing edge targets (RTX 4090: 24 GiB, Jetson Orin: 8-64 GiB
shared with the CPU).

Weights: every transformer linear at the scheme's bits plus one scale (2 bytes, fp16 on GPU targets)
per group, and one zero point per group when asymmetric; embeddings, the output head (kept in float
by the shipped recipes) and norms at 2 bytes. KV cache (only when a caching pass keeps one):
2 (K and V) x layers x kv_heads x head_dim x batch x sequence x kv bytes.

Mixture of experts: every expert is stored (quantized per expert, like any linear), the routers and
expert biases stay in float; a token reads only its top_k experts per layer, which `active` counts
(the bandwidth a step needs per token, against `weights`, the memory the model needs).

DiffusionGemma (a Gemma4Config): per layer type its own attention geometry (full layers have no v_proj),
a dense MLP beside the experts, the self-conditioning MLP quantized like any linear; the router's
projection and scales stay in float. Its encoder cache keeps every position on full layers and the last
sliding_window - 1 on sliding layers; the decoder's canvas K/V is never cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlmc.models.gemma4 import Gemma4Config
from dlmc.models.transformer import ArchConfig
from dlmc.quant.scheme import Scheme

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryBudget:
    weights: int
    kv_cache: int
    active: int = 0
    """Weight bytes one token reads: all of them for a dense model, the top_k experts for an MoE layer."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def describe(self) -> str:
        active = f" (read per token {self.active / GIB:.2f} GiB)" if self.active < self.weights else ""
        return (f"weights {self.weights / GIB:.2f} GiB{active} + KV cache {self.kv_cache / GIB:.2f} GiB "
                f"= {self.total / GIB:.2f} GiB")


def linear_shapes(arch: ArchConfig | Gemma4Config, *, active: bool = False) -> list[tuple[int, int]]:
    """(out, in) of every linear in the transformer layers (not the head, not the MoE routers). With
    `active`, an MoE layer's experts count top_k times (what one token reads), else num_experts."""
    if isinstance(arch, Gemma4Config):
        return _gemma_linear_shapes(arch, active)
    d, hd, moe = arch.hidden_size, arch.head_dim, arch.moe
    attention = [(arch.num_heads * hd, d), (arch.num_kv_heads * hd, d), (arch.num_kv_heads * hd, d),
                 (d, arch.num_heads * hd)]  # a fused QKV has the same parameters as q, k, v

    def swiglu(width: int) -> list[tuple[int, int]]:
        return [(width, d), (width, d), (d, width)]

    shapes: list[tuple[int, int]] = []
    for n in range(arch.num_layers):
        shapes += attention
        if moe is None or n not in moe.layers:
            shapes += swiglu(arch.intermediate_size)
            continue
        shapes += swiglu(moe.expert_size) * (moe.top_k if active else moe.num_experts)
        if moe.shared_size is not None:
            shapes += swiglu(moe.shared_size)
    return shapes


def float_params(arch: ArchConfig | Gemma4Config) -> int:
    """Parameters kept in float under any scheme: embeddings and head, norms, MoE routers and biases."""
    if isinstance(arch, Gemma4Config):
        return _gemma_float_params(arch)
    d, moe = arch.hidden_size, arch.moe
    embeddings = arch.vocab_size * d * (1 if arch.tie_embeddings else 2)
    norms = d * (2 * arch.num_layers + 1) + (2 * arch.head_dim * arch.num_layers if arch.qk_norm else 0)
    routers = 0 if moe is None else len(moe.layers) * moe.num_experts * (d + int(moe.expert_bias))
    return embeddings + norms + routers


def weight_bytes(
    arch: ArchConfig | Gemma4Config, scheme: Scheme | None, float_bytes: int = 2, scale_bytes: int = 2, *,
    active: bool = False,
) -> int:
    """Bytes of the weights under `scheme` (None: all float); `active`: those one token reads (MoE)."""
    total = 0
    for out, inn in linear_shapes(arch, active=active):
        if scheme is None:
            total += out * inn * float_bytes
            continue
        groups = inn // (scheme.group_size or inn)
        total += out * inn * scheme.bits // 8 + out * groups * (scale_bytes + (0 if scheme.symmetric else 1))
    return total + float_params(arch) * float_bytes


def kv_cache_bytes(arch: ArchConfig | Gemma4Config, *, batch: int, seq: int, kv_bytes: int = 2) -> int:
    if isinstance(arch, Gemma4Config):
        return _gemma_kv_cache_bytes(arch, batch=batch, seq=seq, kv_bytes=kv_bytes)
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * batch * seq * kv_bytes


def memory_budget(
    arch: ArchConfig | Gemma4Config, scheme: Scheme | None, *, batch: int = 1, seq: int = 0, kv_bytes: int = 2
) -> MemoryBudget:
    """Weights under `scheme` (None: fp16/bf16) and a KV cache of batch x seq tokens (seq 0: none)."""
    return MemoryBudget(weight_bytes(arch, scheme), kv_cache_bytes(arch, batch=batch, seq=seq, kv_bytes=kv_bytes),
                        weight_bytes(arch, scheme, active=True))


def _gemma_linear_shapes(arch: Gemma4Config, active: bool) -> list[tuple[int, int]]:
    d, H = arch.hidden_size, arch.num_heads
    gated = [(arch.intermediate_size, d), (arch.intermediate_size, d), (d, arch.intermediate_size)]
    expert = [(2 * arch.expert_size, d), (d, arch.expert_size)]  # gate_up [2F, d], down [d, F]
    shapes: list[tuple[int, int]] = list(gated)  # the self-conditioning MLP
    for kind, hd, kv in zip(arch.layer_types, arch.head_dims, arch.kv_heads, strict=True):
        shapes += [(H * hd, d), (kv * hd, d), (d, H * hd)]  # q, k, o
        if kind == "sliding_attention":
            shapes.append((kv * hd, d))  # v (full layers reuse the K projection)
        shapes += gated + expert * (arch.top_k if active else arch.num_experts)
    return shapes


def _gemma_float_params(arch: Gemma4Config) -> int:
    d, E = arch.hidden_size, arch.num_experts
    # per layer: 7 norms, the router's scale, projection and per-expert scale, q/k norms, two layer scalars
    layers = sum(7 * d + d + E * d + E + 2 * hd + 2 for hd in arch.head_dims)
    return arch.vocab_size * d + layers + 2 * d  # tied embedding/head; final norm, self-conditioning pre-norm


def _gemma_kv_cache_bytes(arch: Gemma4Config, *, batch: int, seq: int, kv_bytes: int) -> int:
    kept = [min(seq, arch.sliding_window - 1) if kind == "sliding_attention" else seq for kind in arch.layer_types]
    per_token = sum(2 * kv * hd * n for kv, hd, n in zip(arch.kv_heads, arch.head_dims, kept, strict=True))
    return per_token * batch * kv_bytes
