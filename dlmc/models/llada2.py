"""LLaDA2.0 / LLaDA2.1 (LLaDA2MoeModelLM): BailingMoeV2 layers (fused QKV, per-head QK-norm, partial
RoPE), dense MLP on the first first_k_dense_replace layers, then a shared expert plus a group-limited
sigmoid router (expert bias for the choice only, renormalised, times routed_scaling_factor), block-causal
attention with the official sampler's block of 32, same-position logits."""

from __future__ import annotations

from pathlib import Path

from dlmc.errors import DlmcError
from dlmc.models.checkpoint import field, rename
from dlmc.models.llada_moe import check_supported, mask_token
from dlmc.models.moe import expert_rules, moe_config
from dlmc.models.transformer import ArchConfig, default_head_dim
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("LLaDA2MoeModelLM",)
FAMILY = "llada2"
BLOCK_SIZE = 32
"""generate()'s block_length, which its attention mask is built with (config.json has no field for it)."""

# The published code hard-wires sigmoid scores, an fp32 router and renormalised weights; these
# options must agree (or be absent / null).
_SUPPORTED = {
    "score_function": "sigmoid",
    "router_dtype": "fp32",
    "norm_topk_prob": True,
    "use_bias": False,
    "norm_head": False,
    "rope_scaling": None,
    "hidden_act": "silu",
}


def read_config(config: dict, where: Path, token_id) -> tuple[ArchConfig, DenoiserSpec]:
    def need(key, default=None):
        return field(config, key, where, FAMILY, default)

    check_supported(config, where, _SUPPORTED)
    if "use_bias" not in config:  # the class default is True: a config without the field has biases
        raise DlmcError(f"{where}: missing field 'use_bias' needed by the {FAMILY} family")
    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    head_dim = need("head_dim", default_head_dim(hidden, heads, where))
    rotary_dim = int(head_dim * need("partial_rotary_factor", 1.0))
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise DlmcError(f"{where}: field 'partial_rotary_factor' gives {rotary_dim} rotary dims of {head_dim}")
    first_dense = need("first_k_dense_replace", 0)
    if not isinstance(first_dense, int) or not 0 <= first_dense <= layers:
        raise DlmcError(f"{where}: field 'first_k_dense_replace' must be an integer in 0..{layers}")
    shared = need("num_shared_experts", 0)
    if not isinstance(shared, int) or shared < 0:
        raise DlmcError(f"{where}: field 'num_shared_experts' must be an integer >= 0")
    expert_size = need("moe_intermediate_size")
    moe = moe_config(
        where,
        num_experts=need("num_experts"),
        top_k=need("num_experts_per_tok"),
        expert_size=expert_size,
        layers=tuple(range(first_dense, layers)),
        shared_size=config.get("moe_shared_expert_intermediate_size") or expert_size * shared or None,
        router="sigmoid",
        renormalize=True,
        scaling=float(need("routed_scaling_factor", 1.0)),
        num_groups=need("n_group"),
        topk_groups=need("topk_group"),
        expert_bias=bool(need("moe_router_enable_expert_bias", True)),
        router_fp32=True,
        combine_fp32=True,
    )
    arch = ArchConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=need("num_key_value_heads", heads),
        head_dim=head_dim,
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        rms_norm_eps=need("rms_norm_eps", 1e-5),
        rope_theta=float(need("rope_theta")),
        qkv_bias=bool(config.get("use_qkv_bias", False)),
        qk_norm=bool(need("use_qk_norm", True)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_fp32=False,
        fused_qkv=True,
        rotary_dim=rotary_dim,
        moe=moe,
    )
    spec = DenoiserSpec(
        family=FAMILY,
        mask_token_id=mask_token(config, where, token_id, ("<|mask|>",), FAMILY),
        attention="block_causal",
        block_size=need("block_size", BLOCK_SIZE),
        shift_logits=False,
        vocab_size=arch.vocab_size,
        max_length=need("max_position_embeddings"),
        eos_token_id=config.get("eos_token_id") or token_id("<|endoftext|>"),
        pad_token_id=config.get("pad_token_id"),
        sampler="llada2",  # LLaDA2.0's generate(); llada2_edit is LLaDA2.1's token editing
    )
    return arch, spec


published_name = rename(
    expert_rules(r"model.layers.\1", shared="mlp.shared_experts")
    + [
        (r"embed\.(.*)", r"model.word_embeddings.\1"),
        (r"layers\.(\d+)\.attn_norm\.(.*)", r"model.layers.\1.input_layernorm.\2"),
        (r"layers\.(\d+)\.attn\.qkv_proj\.(.*)", r"model.layers.\1.attention.query_key_value.\2"),
        (r"layers\.(\d+)\.attn\.q_norm\.(.*)", r"model.layers.\1.attention.query_layernorm.\2"),
        (r"layers\.(\d+)\.attn\.k_norm\.(.*)", r"model.layers.\1.attention.key_layernorm.\2"),
        (r"layers\.(\d+)\.attn\.o_proj\.(.*)", r"model.layers.\1.attention.dense.\2"),
        (r"layers\.(\d+)\.mlp_norm\.(.*)", r"model.layers.\1.post_attention_layernorm.\2"),
        (r"layers\.(\d+)\.mlp\.(.*)", r"model.layers.\1.mlp.\2"),
        (r"norm\.(.*)", r"model.norm.\1"),
        (r"lm_head\.(.*)", r"lm_head.\1"),
    ]
)
