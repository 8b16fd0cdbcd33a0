"""LLaDA (LLaDAModelLM): OLMo-style blocks without the causal mask, same-position logits."""

from __future__ import annotations

import math
from pathlib import Path

from dlmc.errors import DlmcError
from dlmc.models.checkpoint import field, rename
from dlmc.models.transformer import ArchConfig, default_head_dim
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("LLaDAModelLM",)
FAMILY = "llada"

# Published-config options our model code does not implement; each must hold the value given here.
_SUPPORTED = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "alibi": False,
    "rope": True,
    "attention_layer_norm": False,
    "block_group_size": 1,
}


def read_config(config: dict, where: Path, token_id) -> tuple[ArchConfig, DenoiserSpec]:
    def need(key, default=None, required=True):
        return field(config, key, where, FAMILY, default, required)

    for key, value in _SUPPORTED.items():
        if key in config and config[key] is not None and config[key] != value:
            raise DlmcError(f"{where}: field '{key}'={config[key]!r} is not supported (only {value!r})")
    d_model, n_heads, n_layers = need("d_model"), need("n_heads"), need("n_layers")
    n_kv_heads = 1 if config.get("multi_query_attention") else need("n_kv_heads", n_heads)
    vocab = need("vocab_size")
    embedding_size = need("embedding_size", vocab)
    mlp_hidden = config.get("mlp_hidden_size") or need("mlp_ratio") * d_model
    include_bias = bool(config.get("include_bias", False))
    arch = ArchConfig(
        hidden_size=d_model,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv_heads,
        head_dim=default_head_dim(d_model, n_heads, where),
        intermediate_size=mlp_hidden,
        vocab_size=embedding_size,
        rms_norm_eps=need("rms_norm_eps", 1e-5),
        rope_theta=float(need("rope_theta", 10000.0)),
        qkv_bias=include_bias or bool(config.get("include_qkv_bias", False)),
        out_bias=include_bias,
        tie_embeddings=bool(need("weight_tying", False, required=False)),
        rope_fp32=bool(config.get("rope_full_precision", True)),
        embed_scale=math.sqrt(d_model) if config.get("input_emb_norm") else 1.0,
        logit_scale=1 / math.sqrt(d_model) if config.get("scale_logits") else 1.0,
    )
    spec = DenoiserSpec(
        family=FAMILY,
        mask_token_id=need("mask_token_id"),
        attention="bidirectional",
        block_size=None,
        shift_logits=False,
        vocab_size=embedding_size,
        max_length=need("max_sequence_length"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        eot_token_id=token_id("<|eot_id|>"),
    )
    return arch, spec


published_name = rename(
    [
        (r"embed\.(.*)", r"model.transformer.wte.\1"),
        (r"layers\.(\d+)\.attn_norm\.(.*)", r"model.transformer.blocks.\1.attn_norm.\2"),
        (r"layers\.(\d+)\.attn\.o_proj\.(.*)", r"model.transformer.blocks.\1.attn_out.\2"),
        (r"layers\.(\d+)\.attn\.(.*)", r"model.transformer.blocks.\1.\2"),
        (r"layers\.(\d+)\.mlp_norm\.(.*)", r"model.transformer.blocks.\1.ff_norm.\2"),
        (r"layers\.(\d+)\.mlp\.gate_proj\.(.*)", r"model.transformer.blocks.\1.ff_proj.\2"),
        (r"layers\.(\d+)\.mlp\.up_proj\.(.*)", r"model.transformer.blocks.\1.up_proj.\2"),
        (r"layers\.(\d+)\.mlp\.down_proj\.(.*)", r"model.transformer.blocks.\1.ff_out.\2"),
        (r"norm\.(.*)", r"model.transformer.ln_f.\1"),
        (r"lm_head\.(.*)", r"model.transformer.ff_out.\1"),
    ]
)
