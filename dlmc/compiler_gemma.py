"""compile_model's path for DiffusionGemma: two programs (dlmc.capture_gemma) in one artifact.

    capture (encoder, fused decoder) -> passes (each program) -> lower (each) -> verify (each) -> save

The decoder iteration is the artifact's main step (manifest "backend" and "signature", at the top level);
the encoder program's files lie under encoder/ and its signature and backend entry under
manifest "programs"."encoder", beside the cache layout the runtime reads (dlmc.runtime.gemma_loop). On eager
and unfrozen inductor both programs read one weights.safetensors (dlmc.lower.shared_weights).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from dlmc.capture import StepProgram
from dlmc.capture_gemma import DECODER_OUTPUTS, capture_gemma, layout
from dlmc.errors import DlmcError, one_line
from dlmc.lower import lower
from dlmc.lower.shared_weights import can_share, share_weights
from dlmc.passes.fuse_decode import FuseDecode
from dlmc.passes.quantize import Quantize
from dlmc.passes.quantize_gemma import calibration_batches, gemma_config, quantize_gemma
from dlmc.pipeline import run_passes
from dlmc.recipe import Recipe, dump_recipe

ENCODER_DIR = "encoder"
PASSES = ("fold_constants", "quantize")
"""Passes that run on each program: fold_constants as on any step; quantize with weight-only RTN schemes
(dlmc.passes.quantize_gemma). fuse_decode {decoder: auto} is accepted and needs no work: the decoder
program is always fused with the sampler."""
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def compile_gemma(model, recipe: Recipe, stage) -> tuple[dict[str, Any], Any, Recipe]:
    """(the manifest entries, write_files(staging) -> backend entry of the decoder, the recipe that ran)."""
    passes = tuple(p for p in recipe.passes if not _fused_already(p))
    refused = [p.name for p in passes if p.name not in PASSES]
    if refused:
        raise DlmcError(f"passes: {refused[0]} cannot run on the diffusion_gemma programs yet "
                        f"(they take {', '.join(PASSES)} and fuse_decode {{decoder: auto}})")
    passes = tuple(gemma_config(p) if isinstance(p, Quantize) else p for p in passes)
    stage("capture")
    experts = recipe.capture.moe_experts or recipe.lower.moe_experts
    programs, examples = capture_gemma(model, dataclasses.replace(recipe.capture, moe_experts=experts))
    quantize = next((p for p in passes if isinstance(p, Quantize)), None)
    # from the float programs, before either changes: the decoder's cache is the float encoder's K/V
    calibration = calibration_batches(programs, model, quantize.calibration) if quantize is not None else {}
    steps = {}
    for name, program in programs.items():
        for config in passes:
            stage(f"pass {config.name} ({name})")
            if isinstance(config, Quantize):
                program = quantize_gemma(program, name, config, calibration[name])
            else:
                program = run_passes(program, (config,))
        programs[name] = program
        stage(f"lower {recipe.lower.backend} ({name})")
        try:
            steps[name] = lower(program, recipe.lower, str(model.embed_tokens.weight.device))
        except DlmcError:
            raise
        except Exception as e:
            raise DlmcError(f"lower.backend: {recipe.lower.backend} failed to compile the {name}: {one_line(e)}") from e
        stage(f"verify ({name})")
        verify(name, steps[name], program, examples[name])
    encoder = programs["encoder"]
    entries = {"programs": {"layout": layout(model), "encoder": {"signature": encoder.signature.to_dict()}}}

    def write_files(staging: Path) -> dict[str, Any]:
        (staging / ENCODER_DIR).mkdir()
        entry = steps["encoder"].save(staging / ENCODER_DIR)
        entry["files"] = {role: f"{ENCODER_DIR}/{name}" for role, name in entry["files"].items()}
        main = steps["decoder"].save(staging)
        if can_share(main) and can_share(entry):  # one copy of the weights for both programs
            entry = share_weights(staging, main, entry, ENCODER_DIR)
        entries["programs"]["encoder"]["backend"] = {**entry, "settings": dump_recipe(recipe)["lower"]}
        return main

    return entries, write_files, programs["decoder"]


def _fused_already(config) -> bool:
    return isinstance(config, FuseDecode) and config.decoder == "auto"


def verify(name: str, step, program: StepProgram, inputs: tuple) -> None:
    """The lowered program against the captured one on its example inputs: float outputs within the
    tolerance of their dtype (a broken lowering, not last bits), token outputs on >= 95% of positions."""
    with torch.no_grad():
        expected, actual = _tuple(program(*inputs)), _tuple(step(*(t.contiguous() for t in inputs)))
    names = DECODER_OUTPUTS if name == "decoder" else [t.name for t in program.signature.outputs]
    for out, a, e in zip(names, actual, expected, strict=True):
        a = a.to(e.device)
        if a.shape != e.shape:
            raise DlmcError(f"verify: the lowered {name}'s {out} has shape {list(a.shape)}, expected {list(e.shape)}")
        if e.is_floating_point():
            error = ((a.float() - e.float()).abs() / (1 + e.float().abs())).max().item()
            limit = VERIFY_TOLERANCE.get(e.dtype, 1e-3)
            if not error <= limit:  # also catches NaN
                raise DlmcError(f"verify: the lowered {name}'s {out} differs from the captured one by {error:.3g} "
                                f"(limit {limit})")
        elif (a == e).float().mean().item() < 0.95:  # a sample or argmax flips only at near ties
            raise DlmcError(f"verify: the lowered {name}'s {out} agrees with the captured one on < 95% of positions")


def _tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)
