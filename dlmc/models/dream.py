"""Dream (DreamModel; also Dream-Coder and DiffuCoder): Qwen2 with q/k/v biases, bidirectional,
logits shifted by one."""

from __future__ import annotations

from pathlib import Path

from dlmc.models import qwen
from dlmc.models.transformer import ArchConfig
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("DreamModel",)
FAMILY = "dream"
published_name = qwen.published_name


def read_config(config: dict, where: Path, token_id) -> tuple[ArchConfig, DenoiserSpec]:
    arch = qwen.read_arch(config, where, FAMILY, qkv_bias=True, qk_norm=False)
    spec = DenoiserSpec(
        family=FAMILY,
        mask_token_id=config.get("mask_token_id") or token_id("<|mask|>") or 151666,
        attention="bidirectional",
        block_size=None,
        shift_logits=True,
        vocab_size=arch.vocab_size,
        max_length=qwen.max_length(config, where, FAMILY),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id", 151643),
    )
    return arch, spec
