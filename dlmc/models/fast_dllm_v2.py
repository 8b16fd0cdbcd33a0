"""Fast-dLLM v2 (Fast_dLLM_QwenForCausalLM): Qwen2 weights, block-causal attention over `bd_size`
blocks, logits shifted by one. The published config's misspelt keys (`conplemenrary_mask`) are
accepted as they are; they only concern training."""

from __future__ import annotations

from pathlib import Path

from dlmc.models import qwen
from dlmc.models.checkpoint import field
from dlmc.models.transformer import ArchConfig
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("Fast_dLLM_QwenForCausalLM",)
FAMILY = "fast_dllm_v2"
published_name = qwen.published_name


def read_config(config: dict, where: Path, token_id) -> tuple[ArchConfig, DenoiserSpec]:
    arch = qwen.read_arch(config, where, FAMILY, qkv_bias=True, qk_norm=False)
    spec = DenoiserSpec(
        family=FAMILY,
        # The published config has no mask_token_id: the tokenizer's |<MASK>| is 151665.
        mask_token_id=config.get("mask_token_id") or token_id("|<MASK>|") or 151665,
        attention="block_causal",
        block_size=field(config, "bd_size", where, FAMILY),
        shift_logits=True,
        vocab_size=arch.vocab_size,
        max_length=qwen.max_length(config, where, FAMILY),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )
    return arch, spec
