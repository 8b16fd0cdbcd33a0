"""How much device memory a model needs under a quantization scheme: weights plus KV cache, computed
from the architecture (not guessed), for sizing edge targets (RTX 4090: 24 GiB, Jetson Orin: 8-64 GiB
shared with the CPU).

Weights: every transformer linear at the scheme's bits plus one scale (2 bytes, fp16 on GPU targets)
per group, and one zero point per group when asymmetric; embeddings, the output head (kept in float
by the shipped recipes) and norms at 2 bytes. KV cache (only when a caching pass keeps one):
2 (K and V) x layers x kv_heads x head_dim x batch x sequence x kv bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlmc.models.transformer import ArchConfig
from dlmc.quant.scheme import Scheme

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryBudget:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def describe(self) -> str:
        return (f"weights {self.weights / GIB:.2f} GiB + KV cache {self.kv_cache / GIB:.2f} GiB "
                f"= {self.total / GIB:.2f} GiB")


def linear_shapes(arch: ArchConfig) -> list[tuple[int, int]]:
    """(out, in) of every linear in the transformer layers (not the head)."""
    d, hd = arch.hidden_size, arch.head_dim
    per_layer = [
        (arch.num_heads * hd, d), (arch.num_kv_heads * hd, d), (arch.num_kv_heads * hd, d), (d, arch.num_heads * hd),
        (arch.intermediate_size, d), (arch.intermediate_size, d), (d, arch.intermediate_size),
    ]
    return per_layer * arch.num_layers


def weight_bytes(arch: ArchConfig, scheme: Scheme | None, float_bytes: int = 2, scale_bytes: int = 2) -> int:
    total = 0
    for out, inn in linear_shapes(arch):
        if scheme is None:
            total += out * inn * float_bytes
            continue
        groups = inn // (scheme.group_size or inn)
        total += out * inn * scheme.bits // 8 + out * groups * (scale_bytes + (0 if scheme.symmetric else 1))
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    norms = arch.hidden_size * (2 * arch.num_layers + 1)
    return total + (embeddings + norms) * float_bytes


def kv_cache_bytes(arch: ArchConfig, *, batch: int, seq: int, kv_bytes: int = 2) -> int:
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * batch * seq * kv_bytes


def memory_budget(
    arch: ArchConfig, scheme: Scheme | None, *, batch: int = 1, seq: int = 0, kv_bytes: int = 2
) -> MemoryBudget:
    """Weights under `scheme` (None: fp16/bf16) and a KV cache of batch x seq tokens (seq 0: none)."""
    return MemoryBudget(weight_bytes(arch, scheme), kv_cache_bytes(arch, batch=batch, seq=seq, kv_bytes=kv_bytes))
