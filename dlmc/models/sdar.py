"""SDAR (SDARForCausalLM): Qwen3 with per-head q/k norms, block-causal attention, same-position
logits."""

from __future__ import annotations

from pathlib import Path

from dlmc.models import qwen
from dlmc.models.checkpoint import field
from dlmc.models.transformer import ArchConfig
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("SDARForCausalLM",)
FAMILY = "sdar"
published_name = qwen.published_name


def read_config(config: dict, where: Path, token_id, family: str = FAMILY) -> tuple[ArchConfig, DenoiserSpec]:
    """`family`: SDAR-MoE reads its attention part here, under its own name."""
    arch = qwen.read_arch(config, where, family, qkv_bias=bool(config.get("attention_bias", False)), qk_norm=True)
    spec = DenoiserSpec(
        family=family,
        mask_token_id=field(config, "mask_token_id", where, family),
        attention="block_causal",
        block_size=field(config, "block_size", where, family),
        shift_logits=False,
        vocab_size=arch.vocab_size,
        max_length=qwen.max_length(config, where, family),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )
    return arch, spec
