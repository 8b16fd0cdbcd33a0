"""WeDLM (WeDLMForCausalLM): a Qwen2.5 (attention_bias) or Qwen3 (qk_norm) decoder with ordinary
causal attention and explicit position ids; decoding reorders tokens so same-position logits of
the mask rows give the predictions."""

from __future__ import annotations

from pathlib import Path

from dlmc.models import qwen
from dlmc.models.transformer import ArchConfig
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("WeDLMForCausalLM",)
FAMILY = "wedlm"
published_name = qwen.published_name


def read_config(config: dict, where: Path, token_id) -> tuple[ArchConfig, DenoiserSpec]:
    arch = qwen.read_arch(
        config,
        where,
        FAMILY,
        qkv_bias=bool(config.get("attention_bias", False)),
        qk_norm=bool(config.get("qk_norm", False)),
    )
    spec = DenoiserSpec(
        family=FAMILY,
        # The WeDLM engine falls back to 151665 when the config has no mask id.
        mask_token_id=config.get("mask_token_id", 151665),
        attention="causal",
        block_size=None,
        shift_logits=False,
        vocab_size=arch.vocab_size,
        max_length=qwen.max_length(config, where, FAMILY),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )
    return arch, spec
