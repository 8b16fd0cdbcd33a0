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


def read_config(config: dict, where: Path, token_id) -> tuple[ArchConfig, DenoiserSpec]:
    arch = qwen.read_arch(config, where, FAMILY, qkv_bias=bool(config.get("attention_bias", False)), qk_norm=True)
    spec = DenoiserSpec(
        family=FAMILY,
        mask_token_id=field(config, "mask_token_id", where, FAMILY),
        attention="block_causal",
        block_size=field(config, "block_size", where, FAMILY),
        shift_logits=False,
        vocab_size=arch.vocab_size,
        max_length=qwen.max_length(config, where, FAMILY),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )
    return arch, spec
