"""SDAR-MoE (SDARMoeForCausalLM): SDAR's block diffusion on Qwen3-MoE layers (softmax top-k router,
renormalised per norm_topk_prob, no shared expert), block-causal attention, same-position logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dlmc.errors import DlmcError
from dlmc.models import qwen, sdar
from dlmc.models.checkpoint import field, rename
from dlmc.models.moe import expert_rules, moe_config
from dlmc.models.transformer import ArchConfig
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("SDARMoeForCausalLM",)
FAMILY = "sdar_moe"


def read_config(config: dict, where: Path, token_id) -> tuple[ArchConfig, DenoiserSpec]:
    def need(key, default=None):
        return field(config, key, where, FAMILY, default)

    arch, spec = sdar.read_config(config, where, token_id, FAMILY)
    layers = arch.num_layers
    step = need("decoder_sparse_step", 1)
    dense = need("mlp_only_layers", [])
    if not isinstance(dense, list) or any(not isinstance(n, int) or not 0 <= n < layers for n in dense):
        raise DlmcError(f"{where}: field 'mlp_only_layers' must list layer indices below {layers}")
    moe = moe_config(
        where,
        num_experts=need("num_experts"),
        top_k=need("num_experts_per_tok"),
        expert_size=need("moe_intermediate_size"),
        layers=tuple(n for n in range(layers) if n not in dense and (n + 1) % step == 0),  # Qwen3-MoE's rule
        router="softmax",
        renormalize=need("norm_topk_prob"),
    )
    return dataclasses.replace(arch, moe=moe), spec


published_name = rename(expert_rules(r"model.layers.\1", shared=None) + qwen.RULES)
