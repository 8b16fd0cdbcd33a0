"""The quantize pass on DiffusionGemma's two programs (dlmc.capture_gemma): which schemes it takes there,
what stays float, and the inputs each program is calibrated on.

The encoder and the decoder iteration read the same weights, and the artifact must hold the same quantized
weights in both. Weight-only round to nearest (W8A16, W4A16, any group size) guarantees it: its codes and
scales are a function of the weight alone. GPTQ, AWQ and int8 activations would fit each program to its
own activations, and the two copies would differ; they are refused. Calibration then feeds only the report
(each layer's output SQNR on the calibration inputs), one report per program.

Kept float unless a rule names them: the routers ("*.router.proj": their top-k is where rounding flips
decisions) and the tied embedding / head ("*.embed_tokens": the token lookup and the self-conditioning's
soft embedding read it as well, so a quantized head would be a second copy; dlmc.quant.memory counts it
float). The experts ("*.experts.gate_up_proj", "*.experts.down_proj", stored [E, out, in]) are quantized
per expert from the transposed views grouped_mm reads (dlmc.passes.quantize.find_experts).

Calibration inputs are uniform random tokens: exactly what the decoder's canvas holds at a canvas's first
step (its noise is uniform over the vocabulary), and for the encoder a stand-in for a prompt (no tokenizer
source applies: the model has no mask token to build denoising states from). The encoder batch runs on an
empty cache; the float encoder program's K/V of it fill the cache the decoder batch reads, at the first
step's temperature, with no self-conditioning yet (soft = 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dlmc.capture import StepProgram
from dlmc.capture_gemma import empty_slots
from dlmc.decoding.diffusion_gemma import DiffusionGemmaConfig, temperature
from dlmc.errors import DlmcError
from dlmc.models.diffusion_gemma import GemmaCache
from dlmc.passes.quantize import Quantize, quantize_program
from dlmc.pipeline import check_program
from dlmc.quant.calibration import current_session
from dlmc.quant.scheme import Calibration, Rule

KEEP_FLOAT = (Rule(match="*.router.proj", scheme=None), Rule(match="*.embed_tokens", scheme=None))


def gemma_config(config: Quantize) -> Quantize:
    """The pass's config as it runs on the Gemma programs (the float rules after the user's, which win);
    one line for what cannot run there."""
    for scheme in config.schemes():
        if scheme.activations != "none" or scheme.method != "rtn":
            raise DlmcError(f"quantize: {scheme.label()} cannot run on the diffusion_gemma programs: the encoder "
                            "and decoder share weights, and only weight-only rtn quantizes them identically")
    if config.calibration.source not in (None, "random"):
        raise DlmcError(f"quantize.calibration.source: {config.calibration.source} does not apply to the "
                        "diffusion_gemma programs (no mask token); they calibrate on random tokens (source: random)")
    calibration = dataclasses.replace(config.calibration, source="random")
    return dataclasses.replace(config, rules=config.rules + KEEP_FLOAT, calibration=calibration)


def quantize_gemma(program: StepProgram, name: str, config: Quantize, batches: list[tuple]) -> StepProgram:
    """One program quantized under gemma_config(config); its report (tagged with the program's name) goes
    to the compiler's quant session."""
    result, report = quantize_program(program, config, batches)
    check_program(result.program)
    session = current_session()
    if report and session is not None:
        session.reports.append({"program": name, **report})
    return result.program


def calibration_batches(programs: dict[str, StepProgram], model, calibration: Calibration) -> dict[str, list]:
    """{"encoder": [...], "decoder": [...]}: input tuples of each float program (module doc), rows of
    calibration.samples split into batches the programs take."""
    arch, spec = model.arch, model.spec
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    C, V, d = arch.canvas_length, spec.vocab_size, arch.hidden_size
    L = max(2, min(calibration.seq_len, spec.max_length - C))
    rows = min(calibration.batch_size, programs["encoder"].signature.batch[1])
    sampler = DiffusionGemmaConfig()
    temp = temperature(sampler, sampler.max_denoising_steps).reshape(1).to(device)  # the first step's
    bound = torch.tensor([sampler.entropy_bound], dtype=torch.float32, device=device)
    generator = torch.Generator(device=device).manual_seed(calibration.seed)
    batches: dict[str, list] = {"encoder": [], "decoder": []}
    for start in range(0, calibration.samples, rows):
        B = min(rows, calibration.samples - start)
        ids = torch.randint(0, V, (B, L), generator=generator, device=device)  # [B, L]
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        positions = torch.arange(L, device=device).expand(B, L).contiguous()  # [B, L]
        empty = _empty_cache(model, B)
        encoder_inputs = (ids, mask, positions, *_flat(empty))
        with torch.no_grad():
            kv = programs["encoder"](*encoder_inputs)  # n keys then n values, each [B, Hkv, L, D]
        n = arch.num_layers
        cache = empty.extend(kv[:n], kv[n:], mask, positions, arch.layer_types, arch.sliding_window)
        canvas = torch.randint(0, V, (B, C), generator=generator, device=device)  # [B, C] uniform noise
        exponential = torch.empty(B, C, V, device=device).exponential_(1, generator=generator)  # [B, C, V]
        fresh = torch.randint(0, V, (B, C), generator=generator, device=device)  # [B, C]
        soft = torch.zeros(B, C, d, dtype=dtype, device=device)  # [B, C, d]: no self-conditioning yet
        batches["encoder"].append(encoder_inputs)
        batches["decoder"].append((canvas, L + torch.arange(C, device=device).expand(B, C), *_flat(cache),
                                   soft, temp, bound, exponential, fresh))
    return batches


def _empty_cache(model, batch: int) -> GemmaCache:
    """The programs' empty cache (as dlmc.runtime.gemma_loop builds it): masked slots only, sliding
    layers sliding_window - 1 long, full layers empty_slots long."""
    arch, device, dtype = model.arch, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    slots = empty_slots(arch)
    keys = [torch.zeros(batch, h, arch.sliding_window - 1 if kind == "sliding_attention" else slots, dim,
                        dtype=dtype, device=device)  # [B, Hkv, S_n, D_n]
            for kind, h, dim in zip(arch.layer_types, arch.kv_heads, arch.head_dims, strict=True)]
    mask = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    return GemmaCache(keys, [k.clone() for k in keys], mask, torch.zeros_like(mask, dtype=torch.long))


def _flat(cache: GemmaCache) -> tuple[Any, ...]:
    return (cache.mask, cache.positions, *cache.keys, *cache.values)
