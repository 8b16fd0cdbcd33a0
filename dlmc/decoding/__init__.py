"""Reference decoders: eager re-implementations of the official dLLM samplers, token for token.

They are the fidelity oracle for everything compiled: same model, inputs and seed give the tokens the
official sampler gives. Each decoder is a frozen config dataclass plus one function
`generate(model, spec, prompts, config, *, seed=0, on_step=None) -> Generation`.
"""

from __future__ import annotations

from collections.abc import Callable

from dlmc.decoding import block, diffusion_gemma, dream, freedave, llada, llada2, wedlm
from dlmc.decoding.common import Generation
from dlmc.spec import DenoiserSpec

DECODERS: dict[str, tuple[type, Callable[..., Generation]]] = {
    "llada": (llada.LLaDAConfig, llada.generate),
    "dream": (dream.DreamConfig, dream.generate),
    "block": (block.BlockConfig, block.generate),
    "wedlm": (wedlm.WeDLMConfig, wedlm.generate),
    "llada2": (llada2.LLaDA2Config, llada2.generate),
    "llada2_edit": (llada2.LLaDA2EditConfig, llada2.generate_edit),
    "freedave": (freedave.FreeDaveConfig, freedave.generate),  # lossless draft-and-verify of static llada
    "diffusion_gemma": (diffusion_gemma.DiffusionGemmaConfig, diffusion_gemma.generate),  # uniform-noise canvases
}
"""Closed registry: decoder name -> (config type, generate function)."""

CANVAS_DECODERS: tuple[str, ...] = ("llada", "dream", "block", "wedlm", "llada2", "llada2_edit")
"""Decoders whose generate takes `on_canvas` (see `dlmc.decoding.common.CanvasCallback`)."""


def decode(model, spec: DenoiserSpec, prompts: list[list[int]], decoder: str, config, **kwargs) -> Generation:
    """Run `decoder` on `model`. A compiled artifact (`dlmc.runtime.Engine`) runs its own loop: the
    fused iteration, or this decoder on its step (through a K/V cache manager when it has one)."""
    if hasattr(model, "decode"):
        return model.decode(prompts, decoder, config, **kwargs)
    _, generate = DECODERS[decoder]
    return generate(model, spec, prompts, config, **kwargs)


def config_fields(fields: dict) -> dict:
    """Decoder config fields read back from JSON (an artifact manifest), which has no tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def default_decoder(spec: DenoiserSpec) -> str:
    """The decoder a model's own sampler corresponds to: the spec's sampler, else read from its attention
    and alignment."""
    if spec.sampler is not None:
        return spec.sampler
    if spec.attention == "block_causal":
        return "block"  # Fast-dLLM v2, SDAR
    if spec.attention == "causal":
        return "wedlm"
    return "dream" if spec.shift_logits else "llada"


__all__ = ["CANVAS_DECODERS", "DECODERS", "Generation", "config_fields", "decode", "default_decoder"]
