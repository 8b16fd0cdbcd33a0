"""LLaDA-MoE (LLaDAMoEModelLM): OLMoE-style layers with per-head QK-norm and a softmax top-k router
whose weights are not renormalised, bidirectional attention, same-position logits.

Its config.json says model_type "llada" like dense LLaDA; dispatch is on architectures[0]."""

from __future__ import annotations

from pathlib import Path

from dlmc.errors import DlmcError
from dlmc.models import qwen
from dlmc.models.checkpoint import field, rename
from dlmc.models.moe import expert_rules, moe_config
from dlmc.models.transformer import ArchConfig, default_head_dim
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("LLaDAMoEModelLM",)
FAMILY = "llada_moe"
MASK_TOKENS = ("<|mask|>", "[MASK]")

# Published-config options our model code does not implement; each must hold the value given here
# (or be absent / null).
_SUPPORTED = {
    "hidden_act": "silu",
    "clip_qkv": None,
    "rope_scaling": None,
    "partial_rotary_factor": 1.0,
    "attention_bias": False,
    "moe_router_enable_expert_bias": False,
}


def read_config(config: dict, where: Path, token_id) -> tuple[ArchConfig, DenoiserSpec]:
    def need(key, default=None):
        return field(config, key, where, FAMILY, default)

    check_supported(config, where, _SUPPORTED)
    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    moe_layers = _moe_layers(need("moe_layer_freq"), layers, where)
    expert_size = need("expert_intermediate_size")
    moe = moe_config(
        where,
        num_experts=need("num_experts"),
        top_k=need("num_experts_per_tok"),
        expert_size=expert_size,
        layers=moe_layers,
        shared_size=config.get("shared_expert_intermediate_size"),  # null: no shared expert
        router="softmax",
        renormalize=False,  # norm_topk_prob is ignored by the published code
    )
    dense = need("dense_intermediate_size") if len(moe_layers) < layers else expert_size
    arch = ArchConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=need("num_key_value_heads", heads),
        head_dim=default_head_dim(hidden, heads, where),
        intermediate_size=dense,
        vocab_size=need("vocab_size"),
        rms_norm_eps=need("rms_norm_eps", 1e-5),
        rope_theta=float(need("rope_theta")),
        qk_norm=need("qk_layernorm"),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_fp32=False,
        moe=moe,
    )
    spec = DenoiserSpec(
        family=FAMILY,
        mask_token_id=mask_token(config, where, token_id, MASK_TOKENS, FAMILY),
        attention="bidirectional",  # the published model passes no mask at all
        block_size=None,
        shift_logits=False,
        vocab_size=arch.vocab_size,
        max_length=need("max_position_embeddings"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )
    return arch, spec


def _moe_layers(freq, layers: int, where: Path) -> tuple[int, ...]:
    """moe_layer_freq: one 0/1 per layer (1 = MoE); a bare 1 means every layer."""
    if freq == 1:
        return tuple(range(layers))
    if not isinstance(freq, list) or len(freq) != layers or any(f not in (0, 1) for f in freq):
        raise DlmcError(f"{where}: field 'moe_layer_freq' must list 0 or 1 for each of the {layers} layers")
    return tuple(n for n, f in enumerate(freq) if f == 1)


def check_supported(config: dict, where: Path, supported: dict) -> None:
    for key, value in supported.items():
        if config.get(key) is not None and config[key] != value:
            raise DlmcError(f"{where}: field '{key}'={config[key]!r} is not supported (only {value!r})")


def mask_token(config: dict, where: Path, token_id, names: tuple[str, ...], family: str) -> int:
    """config.json's mask_token_id, else the tokenizer's mask token (the published configs name none)."""
    if config.get("mask_token_id") is not None:
        return config["mask_token_id"]
    for name in names:
        if (found := token_id(name)) is not None:
            return found
    raise DlmcError(f"{where}: missing field 'mask_token_id' needed by the {family} family (and no {names[0]} token)")


published_name = rename(expert_rules(r"model.layers.\1", shared="shared_expert") + qwen.RULES)
