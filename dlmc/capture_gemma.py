"""Capture of DiffusionGemma: two programs in one artifact, the encoder step and the fused decoder iteration.

DiffusionGemma has no single "denoising step": the same weights run as a causal encoder that extends a
K/V cache (over the prompt, then over each committed canvas) and as a bidirectional decoder over
[cache ; canvas]. Each is exported on its own:

  encoder   (input_ids, attention_mask, position_ids [B, L], cache_mask, cache_positions [B, S],
             cache_keys_n, cache_values_n [B, Hkv_n, S_n, D_n] per layer)
            -> keys_n, values_n [B, Hkv_n, L, D_n]: this call's K/V, which the runtime appends
            (GemmaCache.extend: sliding layers keep their last sliding_window - 1 positions, so S_n is
            `window` there and `cache` on full layers).
  decoder   (canvas, position_ids [B, C], the same cache inputs, soft [B, C, d], temperature [1],
             entropy_bound [1], exponential [B, C, V], fresh [B, C])
            -> next_canvas [B, C] (accepted samples, the rest renoised with `fresh`), argmax_canvas
               [B, C], mean_entropy [B], next_soft [B, C, d].

The decoder iteration carries the sampler's per-step maths (dlmc.decoding.diffusion_gemma): logits / T,
the sample argmax(softmax / q) that torch.multinomial draws from q ~ Exp(1) (the runtime draws q and the
renoise tokens from each row's generator in the reference's order), argmax, entropies and the
entropy-bound acceptance. [B, C, V] logits never leave the graph: self-conditioning needs only
softmax(previous logits) @ E * scale, so that soft embedding [B, C, d] is the state passed to the next
step (zeros at a canvas's first step, which is exactly "no self-conditioning": SelfConditioning.forward).
Stability, the adaptive stop, the commit and EOS are the runtime's (dlmc.runtime.gemma_loop).

A cache is never empty: the runtime starts it with empty_slots(arch) masked slots, which take no part in
any softmax (their weight is exp(-inf) = 0). So torch.export sees no zero-size dims, and a sliding layer's
cache is always exactly sliding_window - 1 slots long (a static dim; only full layers' `cache` grows).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from dlmc.artifact import StepSignature, TensorSpec
from dlmc.capture import CaptureConfig, StepProgram, describe_export_failure
from dlmc.decoding.diffusion_gemma import accept, entropy
from dlmc.errors import DlmcError
from dlmc.models.diffusion_gemma import GemmaCache
from dlmc.models.moe import set_experts_form



def empty_slots(arch) -> int:
    """Masked slots an empty cache starts with: one more than a sliding layer keeps, and at least two
    (torch.export specialises dims of size 0 and 1, and a full cache no longer than a sliding one)."""
    return max(2, arch.sliding_window)

DECODER_OUTPUTS = ("next_canvas", "argmax_canvas", "mean_entropy", "next_soft")
"""Names unlike the inputs' and torch's node names (ONNX wants every name once)."""


def cache_names(num_layers: int) -> list[str]:
    return (["cache_mask", "cache_positions"] + [f"cache_keys_{n}" for n in range(num_layers)]
            + [f"cache_values_{n}" for n in range(num_layers)])


def _cache(inputs: tuple, n: int) -> GemmaCache:
    """cache_mask, cache_positions, n keys, n values (flat, as every backend is called) -> GemmaCache."""
    return GemmaCache(list(inputs[2 : 2 + n]), list(inputs[2 + n : 2 + 2 * n]), inputs[0], inputs[1])


class EncoderStep(nn.Module):
    """Flat inputs (input_ids, attention_mask, position_ids, *cache) -> (*keys, *values) of this call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        input_ids, attention_mask, position_ids = inputs[:3]
        cache = _cache(inputs[3:], self.model.arch.num_layers)
        new_keys, new_values = self.model.encode_layers(input_ids, attention_mask, position_ids, cache)
        return (*new_keys, *new_values)


class DecoderStep(nn.Module):
    """One decoder pass fused with the sampler's per-step maths (module doc). Flat inputs (canvas,
    position_ids, *cache, soft, temperature, entropy_bound, exponential, fresh)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        model = self.model
        canvas, position_ids = inputs[:2]
        cache = _cache(inputs[2:-5], model.arch.num_layers)
        soft, temperature, entropy_bound, exponential, fresh = inputs[-5:]
        raw = model.denoise(canvas, position_ids, cache, soft=soft)  # [B, C, V] >= fp32
        processed = raw.float() / temperature  # [B, C, V] fp32
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32)  # [B, C, V]
        sampled = (probs / exponential).argmax(-1)  # [B, C]: torch.multinomial(probs, 1) given its Exp(1) draws
        argmax = processed.argmax(-1)  # [B, C]
        entropies = entropy(processed)  # [B, C]
        accepted = accept(entropies, entropy_bound)  # [B, C]
        weight = model.embed_tokens.weight
        next_soft = model.self_conditioning.soft(processed.to(weight.dtype), weight, model.embed_scale())
        return torch.where(accepted, sampled, fresh), argmax, entropies.mean(-1), next_soft


def capture_gemma(model, config: CaptureConfig) -> tuple[dict[str, StepProgram], dict[str, tuple]]:
    """({"encoder": ..., "decoder": ...}, the example inputs each was exported with) for a DiffusionGemma
    `model` (in the dtype and on the device it runs)."""
    if config.seq_buckets:
        raise DlmcError("capture.seq_buckets: the diffusion_gemma programs take any prompt length; remove it")
    set_experts_form(model, config.moe_experts or "grouped")
    arch, spec = model.arch, model.spec
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    B, C, V, d = min(2, config.max_batch), arch.canvas_length, spec.vocab_size, arch.hidden_size
    window, empty = arch.sliding_window - 1, empty_slots(arch)
    batch = Dim("batch", min=1, max=config.max_batch) if config.max_batch > 1 else None
    cache_dim = Dim("cache", min=empty, max=spec.max_length + empty)
    S = empty + 3  # an example length
    kinds = arch.layer_types
    lengths = [window if kind == "sliding_attention" else S for kind in kinds]
    keys = [torch.randn(B, a.self_attn.kv_heads, n, a.self_attn.head_dim, dtype=dtype, device=device)
            for a, n in zip(model.layers, lengths, strict=True)]
    cache_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    cache_mask[:, :empty] = False
    cache_positions = (cache_mask.long().cumsum(-1) - 1).clamp(min=0)

    def rows(extra):
        return {0: batch, **extra} if batch is not None else dict(extra)

    kv_dims = [rows({} if kind == "sliding_attention" else {2: cache_dim}) for kind in kinds]
    cache_dims = [rows({1: cache_dim}), rows({1: cache_dim}), *kv_dims, *kv_dims]
    cache_inputs = (cache_mask, cache_positions, *keys, *(k.clone() for k in keys))

    L = 4
    ids = torch.arange(B * L, device=device).reshape(B, L) % V
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    pos = S - empty + torch.arange(L, device=device).expand(B, L)
    seq = Dim("seq", min=2, max=spec.max_length)
    encoder = _export(EncoderStep(model), (ids, mask, pos, *cache_inputs),
                      [rows({1: seq})] * 3 + cache_dims, "encoder")

    canvas = torch.arange(B * C, device=device).reshape(B, C) % V
    generator = torch.Generator(device=device).manual_seed(0)
    decoder_inputs = (
        canvas, pos[:, :1] + torch.arange(C, device=device), *cache_inputs,
        torch.zeros(B, C, d, dtype=dtype, device=device), torch.tensor([0.8], device=device),
        torch.tensor([0.1], device=device), torch.empty(B, C, V, device=device).exponential_(1, generator=generator),
        torch.randint(0, V, (B, C), device=device, generator=generator),
    )
    decoder = _export(DecoderStep(model), decoder_inputs,
                      [rows({}), rows({})] + cache_dims + [rows({}), None, None, rows({}), rows({})], "decoder")

    def spec_of(name, t, dims):
        return TensorSpec(name, str(t.dtype).removeprefix("torch."), dims)

    n = arch.num_layers
    kv_shape = [("batch", a.self_attn.kv_heads, window if kind == "sliding_attention" else "cache",
                 a.self_attn.head_dim) for a, kind in zip(model.layers, kinds, strict=True)]
    cache_specs = (spec_of("cache_mask", cache_mask, ("batch", "cache")),
                   spec_of("cache_positions", cache_positions, ("batch", "cache")),
                   *(spec_of(name, keys[0], kv_shape[i % n]) for i, name in enumerate(cache_names(n)[2:])))
    new_kv = tuple(spec_of(f"{part}_{i}", keys[0], kv_shape[i][:2] + ("seq", kv_shape[i][3]))
                   for part in ("keys", "values") for i in range(n))
    # seq: the longest context (prompt + canvases) the programs take, which a server bounds requests by
    bounds = {"batch": (1, config.max_batch), "seq": (2, spec.max_length)}
    encoder_sig = StepSignature(
        inputs=(spec_of("input_ids", ids, ("batch", "seq")), spec_of("attention_mask", mask, ("batch", "seq")),
                spec_of("position_ids", pos, ("batch", "seq")), *cache_specs),
        outputs=new_kv, **bounds,
    )
    decoder_sig = StepSignature(
        inputs=(spec_of("canvas", canvas, ("batch", C)), spec_of("position_ids", pos, ("batch", C)), *cache_specs,
                spec_of("soft", decoder_inputs[-5], ("batch", C, d)), TensorSpec("temperature", "float32", (1,)),
                TensorSpec("entropy_bound", "float32", (1,)), TensorSpec("exponential", "float32", ("batch", C, V)),
                spec_of("fresh", canvas, ("batch", C))),
        outputs=(spec_of(DECODER_OUTPUTS[0], canvas, ("batch", C)), spec_of(DECODER_OUTPUTS[1], canvas, ("batch", C)),
                 TensorSpec(DECODER_OUTPUTS[2], "float32", ("batch",)),
                 spec_of(DECODER_OUTPUTS[3], decoder_inputs[-5], ("batch", C, d))),
        decoder="diffusion_gemma", **bounds,
    )
    programs = {"encoder": StepProgram(exported=encoder, signature=encoder_sig, spec=spec),
                "decoder": StepProgram(exported=decoder, signature=decoder_sig, spec=spec)}
    return programs, {"encoder": (ids, mask, pos, *cache_inputs), "decoder": decoder_inputs}


def layout(model) -> dict:
    """What the runtime needs to build and extend the programs' cache (manifest "programs"."layout")."""
    arch = model.arch
    return {
        "layer_types": list(arch.layer_types), "sliding_window": arch.sliding_window,
        "canvas_length": arch.canvas_length, "hidden_size": arch.hidden_size, "empty_slots": empty_slots(arch),
        "kv_heads_and_dims": [[h, d] for h, d in zip(arch.kv_heads, arch.head_dims, strict=True)],
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
    }


def _export(module: nn.Module, example: tuple, dims: list, name: str):
    try:
        with torch.no_grad():
            return torch.export.export(module, example, dynamic_shapes=(tuple(dims),))  # for *inputs
    except Exception as e:  # torch.export raises many types; the user needs the op and the reason
        raise DlmcError(f"capture: cannot export the diffusion_gemma {name}: {describe_export_failure(e)}") from e

