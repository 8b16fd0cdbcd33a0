"""The Qwen2 / Qwen3 decoder layout shared by Dream, Fast-dLLM v2, SDAR and WeDLM.

Each of those families is a Qwen checkpoint with a different attention structure, mask id and
logits alignment; this module reads the common part of their configs and names.
"""

from __future__ import annotations

from pathlib import Path

from dlmc.models.checkpoint import field, rename
from dlmc.models.transformer import ArchConfig, default_head_dim


def read_arch(config: dict, where: Path, family: str, *, qkv_bias: bool, qk_norm: bool) -> ArchConfig:
    def need(key, default=None):
        return field(config, key, where, family, default)

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    return ArchConfig(
        hidden_size=hidden,
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=need("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or default_head_dim(hidden, heads, where),
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        rms_norm_eps=need("rms_norm_eps", 1e-6),
        rope_theta=float(need("rope_theta", 10000.0)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_fp32=False,
    )


def max_length(config: dict, where: Path, family: str) -> int:
    return field(config, "max_position_embeddings", where, family, 32768)


RULES = [
    (r"embed\.(.*)", r"model.embed_tokens.\1"),
    (r"layers\.(\d+)\.attn_norm\.(.*)", r"model.layers.\1.input_layernorm.\2"),
    (r"layers\.(\d+)\.attn\.(.*)", r"model.layers.\1.self_attn.\2"),
    (r"layers\.(\d+)\.mlp_norm\.(.*)", r"model.layers.\1.post_attention_layernorm.\2"),
    (r"layers\.(\d+)\.mlp\.(.*)", r"model.layers.\1.mlp.\2"),
    (r"norm\.(.*)", r"model.norm.\1"),
    (r"lm_head\.(.*)", r"lm_head.\1"),
]
"""Canonical -> published name rules; the MoE families put their expert rules in front."""
published_name = rename(RULES)
