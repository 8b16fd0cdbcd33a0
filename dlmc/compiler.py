"""compile_model: model directory + recipe -> artifact directory, one stage at a time.

    load -> capture -> passes -> lower -> verify -> save

Each stage returns its own type (DiffusionLM, StepProgram, StepProgram, a backend step, the artifact
path). Every check that can fail without the weights (the recipe, the output path, the backend
package, the device) runs before the model is loaded, and nothing is written until the artifact is
complete.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from dlmc.artifact import FUSED_OUTPUTS, check_writable, write_artifact
from dlmc.capture import StepProgram, capture, example_inputs, experts_form
from dlmc.compiler_gemma import compile_gemma
from dlmc.errors import DlmcError, one_line
from dlmc.lower import LoweredStep, lower
from dlmc.models import default_dtype, load_model, quantization, read_model_config
from dlmc.passes import PassConfig, layer_skip
from dlmc.passes.fuse_decode import FuseDecode
from dlmc.pipeline import run_passes
from dlmc.quant import ops as _quant_ops  # noqa: F401  (registers torch.ops.dlmc)
from dlmc.quant.calibration import quant_session
from dlmc.recipe import Recipe, check_target, default_recipe, dump_recipe, load_recipe
from dlmc.runtime.cache import empty_cache
from dlmc.tokenizer import load_tokenizer

QUANT_REPORT = "quant_report.json"
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Largest |lowered - captured| / (1 + |captured|) the verify stage accepts: it catches a broken
lowering, not last-bit differences (fidelity to the reference decoder is tested, not assumed)."""
ACT_QUANT_TOLERANCE = 0.25
"""The same, for a step that rounds activations to int8: a last-bit float difference upstream moves an
activation across a rounding boundary, a whole int8 step (measured on the embedded model: 0.05-0.13
between eager and Inductor / ONNX Runtime, with identical argmax). A broken lowering is off by >> 1."""
ACT_QUANT_OP = torch.ops.dlmc.linear_w8a8.default
PROGRAMS = {"diffusion_gemma": compile_gemma}
"""Closed registry: family -> its multi-program compile path (returns manifest entries, a writer, the main
step's program); every other family is one captured step."""


def compile_model(
    model_dir: str | Path,
    recipe: Recipe | str | Path | None,
    out_dir: str | Path,
    *,
    force: bool = False,
    device: str = "cpu",
    on_stage: Callable[[str], None] | None = None,
) -> Path:
    """Compile the checkpoint in `model_dir` with `recipe` (a Recipe, a YAML path, or None for
    `default_recipe(device)`) into the artifact directory `out_dir`, and return its path.

    `on_stage` is called with a short label as each stage starts: "load", "capture",
    "pass <name>", "lower <backend>", "verify", "save"."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    stage = on_stage or (lambda label: None)
    if recipe is None:
        recipe = default_recipe(device)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    check_writable(out_dir, force=force)
    read_model_config(model_dir)  # a missing or broken checkpoint fails here, before any work
    stored = str(default_dtype(model_dir)).removeprefix("torch.")  # a bitsandbytes checkpoint: what it decodes to
    problems = check_target(recipe, device, stored)
    if problems:
        raise DlmcError("; ".join(problems))

    stage("load")
    dtype = getattr(torch, recipe.capture.dtype) if recipe.capture.dtype else None
    model = load_model(model_dir, device=device, dtype=dtype)
    if model.spec.family in PROGRAMS:  # a family that runs as several programs (DiffusionGemma: encoder, decoder)
        with quant_session(model_dir, model) as quant:  # each program's quantize report
            entries, write_step, main = PROGRAMS[model.spec.family](model, recipe, stage)
        stage("save")
        manifest = _manifest(recipe, main, stored, model_dir, device) | entries

        def write_programs(staging: Path) -> None:
            manifest["backend"] = {**write_step(staging), "settings": dump_recipe(recipe)["lower"]}
            if quant.reports:
                (staging / QUANT_REPORT).write_text(json.dumps(quant.reports, indent=1) + "\n")

        return write_artifact(out_dir, manifest, write_programs, tokenizer_from=model_dir, force=force)

    stage("capture")
    experts = experts_form(recipe.capture, recipe.lower)  # onnxrt / tensorrt: tiled (no grouped GEMM)
    program = capture(model, dataclasses.replace(recipe.capture, moe_experts=experts))
    reference = program  # the captured step, before any pass: what "verify" compares against

    applied, calibrations, tokenizer = [], {}, load_tokenizer(model_dir)

    def resolve(program: StepProgram, config: PassConfig) -> PassConfig:
        if isinstance(config, FuseDecode):  # decoder: auto -> the model's own sampler, as the manifest records
            config = config.resolved(program.spec)
        resolved, calibration = layer_skip.resolve(program, config, tokenizer, model_dir, model)
        if calibration is not None:  # the measurement behind the choice, for the progress log and the manifest
            calibrations[len(applied)] = calibration.to_dict()
            stage(f"calibrate {config.name}: {calibration.canvases} canvases, cos(in, out) per layer "
                  f"{calibration.summary()}; dropping layers {list(resolved.layers)}")
        applied.append(resolved)
        return resolved

    with quant_session(model_dir, model) as quant:  # the quantize pass calibrates with the checkpoint's tokenizer
        program = run_passes(
            program, recipe.passes, on_pass=lambda p: stage(f"pass {p.name}"), resolve=resolve
        )
    recipe = dataclasses.replace(recipe, passes=tuple(applied))  # the manifest records what ran

    stage(f"lower {recipe.lower.backend}")
    try:
        step = lower(program, recipe.lower, device)
    except DlmcError:
        raise
    except Exception as e:
        raise DlmcError(f"lower.backend: {recipe.lower.backend} failed to compile the step: {one_line(e)}") from e

    stage("verify")
    verify(step, program, reference if recipe.exact else program)

    stage("save")
    manifest = _manifest(recipe, program, stored, model_dir, device)
    for i, calibration in calibrations.items():
        manifest["passes"][i]["calibration"] = calibration

    def write_files(staging: Path) -> None:
        manifest["backend"] = {**step.save(staging), "settings": dump_recipe(recipe)["lower"]}
        if quant.reports:  # what was quantized and how much each layer's output moved
            (staging / QUANT_REPORT).write_text(json.dumps(quant.reports, indent=1) + "\n")

    return write_artifact(out_dir, manifest, write_files, tokenizer_from=model_dir, force=force)


def verify(step: LoweredStep, program: StepProgram, reference: StepProgram) -> None:
    """Run the lowered step and the program it came from on a padded batch; refuse a lowering whose
    logits are not the program's (exact recipes compare against the step as captured)."""
    sig = program.signature
    device = next(iter(program.exported.state_dict.values())).device if program.exported.state_dict else "cpu"
    lengths = sig.seq_buckets[:1] or (min(max(sig.seq[0], 7), sig.seq[1]),)
    inputs = example_inputs(batch=min(2, sig.batch[1]), seq=lengths[0], device=device)
    # The loosest tolerance among the dtypes the step computes in (mixed precision keeps fp32 logits).
    dtypes = {t.dtype for t in program.exported.state_dict.values() if t.is_floating_point()}
    if sig.fused:
        return _verify_fused(step, program, inputs, dtypes)
    with torch.no_grad():
        nothing_cached = empty_cache(reference.signature, len(inputs[0]), device) if reference.signature.cache else ()
        expected = _outputs(reference(*inputs, *nothing_cached))[0]
        limit = max(VERIFY_TOLERANCE.get(d, 1e-3) for d in dtypes | {expected.dtype})
        if any(node.target is ACT_QUANT_OP for node in program.graph_module.graph.nodes):
            limit = max(limit, ACT_QUANT_TOLERANCE)
        if sig.cache is None:
            _compare("", _outputs(step(*inputs))[0], expected, limit)
            return
        # A cached step, first with nothing cached, then with the first columns' K/V taken from the cache:
        # both must give the plain step's logits (the keys come from the same canvas, so this is exact).
        logits, keys, values = _outputs(step(*inputs, *empty_cache(sig, len(inputs[0]), device)))
        _compare(" with an empty cache", logits, expected, limit)
        split = inputs[0].shape[1] // 2
        ids, mask, pos = (t[:, split:] for t in inputs)
        cached = (inputs[1][:, :split], inputs[2][:, :split], keys[..., :split, :], values[..., :split, :])
        ids, mask, pos, *cached = (t.contiguous() for t in (ids, mask, pos, *cached))
        logits = _outputs(step(ids, mask, pos, *cached))[0]
        _compare(" with a cached prefix", logits, expected[:, split:], limit)


def _verify_fused(step: LoweredStep, program: StepProgram, inputs: tuple[torch.Tensor, ...], dtypes: set) -> None:
    """A step with the decoding rule fused on (whose fusion the tests hold to the reference decoders):
    the lowered step's tokens and confidences against the program's, every row a head row."""
    sig = program.signature
    batch, length = inputs[0].shape
    device = inputs[0].device
    inputs += empty_cache(sig, batch, device) if sig.cache else ()
    inputs += (torch.arange(length, device=device).expand(batch, length).contiguous(),)  # head_rows [B, L]
    generator = torch.Generator().manual_seed(0)
    for spec in sig.inputs[sig.names.index("head_rows") + 1 :]:  # the rule's draws and settings
        shape = (batch, length, *spec.shape[2:]) if len(spec.shape) == 3 else spec.shape  # [B, L, V] or [1]
        dtype = getattr(torch, spec.dtype)
        example = {"uniform": lambda: torch.rand(shape, dtype=dtype, generator=generator),
                   "exponential": lambda: torch.empty(shape, dtype=dtype).exponential_(1, generator=generator),
                   "noise": lambda: torch.empty(shape, dtype=dtype).exponential_(1, generator=generator),
                   "temperature": lambda: torch.tensor([0.7], dtype=dtype),
                   "top_p": lambda: torch.tensor([0.9], dtype=dtype),
                   "top_k": lambda: torch.tensor([5], dtype=dtype),
                   "slots": lambda: torch.arange(length).expand(batch, length).contiguous(),  # wedlm
                   "pos_penalty": lambda: torch.tensor([0.02], dtype=dtype),
                   "entropy_threshold": lambda: torch.tensor([4.0], dtype=dtype)}[spec.name]
        inputs += (example().to(device),)
    with torch.no_grad():
        expected = _outputs(program(*inputs))
        actual = _outputs(step(*inputs))
    names = FUSED_OUTPUTS[sig.fused_decoder]
    limit = max(VERIFY_TOLERANCE.get(d, 1e-3) for d in dtypes | {expected[1].dtype})
    for name, a, e in zip(names, actual[: len(names)], expected[: len(names)]):
        if e.is_floating_point():
            _compare(f" ({name})", a, e, limit)
            continue
        # Decisions (an arg-max, a threshold) flip only at near ties, which the float outputs above bound
        # (a less likely token returns its lower probability). Near ties are common in a random-weight
        # model's flat bf16 logits (up to ~10% of rows flip with another GEMM kernel, e.g. frozen
        # weights); a broken decision output disagrees almost everywhere.
        agree = (a.to(e.device) == e).float().mean().item()
        if agree < 0.5:
            raise DlmcError(f"verify: the lowered step's {name} agree with the fused program's on {agree:.0%} of rows")


def _outputs(result: Any) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _compare(case: str, actual: torch.Tensor, expected: torch.Tensor, limit: float) -> None:
    actual = actual.to(expected.device)
    if actual.shape != expected.shape:
        raise DlmcError(
            f"verify: the lowered step{case} returns shape {list(actual.shape)}, expected {list(expected.shape)}"
        )
    error = ((actual.float() - expected.float()).abs() / (1 + expected.float().abs())).max().item()
    if not error <= limit:  # also catches NaN
        raise DlmcError(
            f"verify: the lowered step's logits{case} differ from the captured step's by {error:.3g} (limit {limit})"
        )


def _manifest(recipe: Recipe, program: StepProgram, stored: str, model_dir: Path, device: str) -> dict[str, Any]:
    params = sum(t.numel() for t in program.exported.state_dict.values())
    model = {"source": model_dir.name, "path": str(model_dir.resolve()), "checkpoint_dtype": stored, "parameters": params}
    quantized = quantization(model_dir)
    if quantized is not None:  # the float weights the passes saw are a dequantization
        model["weights"] = quantized.label()
    return {
        "dlmc_version": _version("dlmc"),
        "torch_version": torch.__version__,
        "model": model,
        "spec": program.spec.to_dict(),
        "recipe": dump_recipe(recipe),
        "passes": [{"name": p.name, "version": p.version, "exact": p.exact} for p in recipe.passes],
        "exact": recipe.exact,
        "device": device,
        "signature": program.signature.to_dict(),
        # a fused step runs the decoder whose rule it carries, whatever the family's own sampler is
        "decode": {"decoder": recipe.decode.decoder or program.signature.fused_decoder,
                   "config": recipe.decode.config},
    }


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
