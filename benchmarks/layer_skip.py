"""Calibrated layer skipping: quality and speed against the number of skipped layers, in one run.

    python benchmarks/layer_skip.py [--per-task 25] [--skips 0 1 2 3] [--every-single-layer]
    python benchmarks/layer_skip.py --large [--large-skips 0 3 6] [--workdir /tmp/dlmc-bench]

Embedded model (4 layers): for each k, compile with fold_constants + layer_skip {budget: k}
(calibrated at compile time; k = 0 is the same recipe without layer_skip) on AOTInductor, then
decode the held-out task prompts with the reference LLaDA decoder settings of `dlmc eval
--block-length 32` (generation length 128, one token per step) on the artifact. Reported: the layers
calibration chose, task accuracy, token agreement with the reference decoder on the eager
checkpoint (same prompts, same decoder), and the median seconds per step and tokens/s of
`--speed-prompts` prompts, with ratios against the k = 0 artifact and the reference decoder, all
measured in this run. `--every-single-layer` adds each single-layer skip chosen by hand, to show
whether calibration picks the best one.

`--large`: a random LLaDA-format checkpoint of 134M parameters (hidden 768, 12 layers, as in
benchmarks/compile_ratio.py); random weights make accuracy meaningless, so only speed is reported
(generation length 256, 16 steps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import dlmc.runtime
from dlmc.bench import bench_prompts, measure, token_agreement
from dlmc.capture import CaptureConfig
from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig
from dlmc.evaluate import evaluate
from dlmc.generation import default_model_dir
from dlmc.lower.inductor import InductorSettings
from dlmc.models import load_model
from dlmc.passes.fold_constants import FoldConstants
from dlmc.passes.layer_skip import LayerSkip
from dlmc.recipe import Recipe
from dlmc.testing.fixtures import write_checkpoint
from dlmc.tokenizer import load_tokenizer


def recipe_for(skip: int | None = None, layers: tuple[int, ...] | None = None) -> Recipe:
    passes = [FoldConstants()]
    if skip:
        passes.append(LayerSkip(budget=skip))
    if layers is not None:
        passes.append(LayerSkip(layers=layers))
    return Recipe(capture=CaptureConfig(dtype="float32"), passes=tuple(passes), lower=InductorSettings(),
                  description="benchmarks/layer_skip.py")


def compiled(model_dir: Path, recipe: Recipe, out: Path):
    start = time.perf_counter()
    compile_model(model_dir, recipe, out, force=True)
    engine = dlmc.runtime.load(out)
    passes = engine.manifest["recipe"]["passes"]
    layers = next((p["layer_skip"]["layers"] for p in passes if "layer_skip" in p), [])
    return engine, layers, time.perf_counter() - start


def embedded(args: argparse.Namespace) -> list[dict]:
    model_dir = default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    reference = load_model(model_dir)
    config = LLaDAConfig(gen_length=128, steps=128, block_length=32)
    eval_args = dict(per_task=args.per_task, batch_size=25)
    speed_prompts = bench_prompts(reference.spec, tokenizer, args.speed_prompts, seed=0)
    speed_args = dict(repeats=args.repeats, seed=0)

    ref_eval = evaluate(reference, reference.spec, tokenizer, "llada", config, **eval_args)
    ref_ids = [c.output_ids for c in ref_eval.completions]
    ref_speed = measure("reference", reference, reference.spec, speed_prompts, "llada", config, **speed_args)
    rows = [{"name": "reference (eager, all layers)", "layers": [], "parameters": reference.num_parameters(),
             "accuracy": ref_eval.accuracy, "per_task": ref_eval.per_task, "agreement": 1.0,
             "s_per_step": ref_speed.seconds_per_step, "tok_per_s": ref_speed.tokens_per_s}]
    print(f"reference: accuracy {ref_eval.accuracy:.1%} of {ref_eval.examples}, "
          f"{ref_speed.seconds_per_step * 1e3:.2f} ms/step", flush=True)

    runs = [(f"skip {k}", recipe_for(skip=k)) for k in args.skips]
    if args.every_single_layer:
        runs += [(f"layer {i} by hand", recipe_for(layers=(i,))) for i in range(reference.arch.num_layers)]
    for name, recipe in runs:
        out = args.workdir / "layer-skip-embedded"
        engine, layers, compile_s = compiled(model_dir, recipe, out)
        report = evaluate(engine, engine.spec, tokenizer, "llada", config, **eval_args)
        speed = measure(name, engine, engine.spec, speed_prompts, "llada", config, **speed_args)
        row = {"name": name, "layers": layers, "parameters": engine.manifest["model"]["parameters"],
               "accuracy": report.accuracy, "per_task": report.per_task,
               "agreement": token_agreement([c.output_ids for c in report.completions], ref_ids),
               "s_per_step": speed.seconds_per_step, "tok_per_s": speed.tokens_per_s, "compile_s": compile_s}
        rows.append(row)
        print(f"{name}: layers {layers}, accuracy {report.accuracy:.1%}, agreement {row['agreement']:.1%}, "
              f"{speed.seconds_per_step * 1e3:.2f} ms/step", flush=True)
        del engine
        shutil.rmtree(out, ignore_errors=True)
    print(f"\nembedded model, {ref_eval.examples} held-out prompts (dlmc eval --block-length 32 settings), "
          f"speed on {len(speed_prompts)} prompts, median of {args.repeats}:")
    print(table(rows, base="skip 0"))
    return rows


def large(args: argparse.Namespace) -> list[dict]:
    model_dir = args.workdir / "llada-134m"
    if not (model_dir / "config.json").is_file():
        write_checkpoint("llada", model_dir, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048,
                         vocab=32000, max_length=512, shards=3)
    reference = load_model(model_dir)
    config = LLaDAConfig(gen_length=256, steps=16)
    prompts = bench_prompts(reference.spec, load_tokenizer(model_dir), 1, seed=0)
    ref = measure("reference", reference, reference.spec, prompts, "llada", config, repeats=args.repeats)
    rows = [{"name": "reference (eager, all layers)", "layers": [], "parameters": reference.num_parameters(),
             "agreement": 1.0, "s_per_step": ref.seconds_per_step, "tok_per_s": ref.tokens_per_s}]
    del reference
    for k in args.large_skips:
        out = args.workdir / "layer-skip-large"
        engine, layers, compile_s = compiled(model_dir, recipe_for(skip=k), out)
        speed = measure(f"skip {k}", engine, engine.spec, prompts, "llada", config, reference=ref.output_ids,
                        repeats=args.repeats)
        rows.append({"name": f"skip {k}", "layers": layers, "parameters": engine.manifest["model"]["parameters"],
                     "agreement": speed.agreement, "s_per_step": speed.seconds_per_step,
                     "tok_per_s": speed.tokens_per_s, "compile_s": compile_s})
        print(f"skip {k}: layers {layers}, {speed.seconds_per_step * 1e3:.1f} ms/step", flush=True)
        del engine
        shutil.rmtree(out, ignore_errors=True)
    print("\n134M random LLaDA checkpoint, 1 prompt, generation length 256, 16 steps (speed only):")
    print(table(rows, base="skip 0"))
    return rows


def table(rows: list[dict], base: str) -> str:
    k0 = next(r for r in rows if r["name"] == base)
    ref = rows[0]
    quality = "accuracy" in ref
    head = "| run | skipped layers | step parameters |"
    head += " accuracy | agreement | ms/step | tok/s | speed vs skip 0 | speed vs reference |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        accuracy = f"{r['accuracy']:.1%}" if quality else "-"
        lines.append(
            f"| {r['name']} | {r['layers'] or '-'} | {r['parameters']:,} | {accuracy} | {r['agreement']:.1%} | "
            f"{r['s_per_step'] * 1e3:.2f} | {r['tok_per_s']:.1f} | {r['tok_per_s'] / k0['tok_per_s']:.2f}x | "
            f"{r['tok_per_s'] / ref['tok_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)  # a shared 2-core machine: one thread per process keeps the ratios stable
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-task", type=int, default=25, help="held-out prompts per task (4 tasks)")
    ap.add_argument("--skips", type=int, nargs="*", default=[0, 1, 2, 3])
    ap.add_argument("--every-single-layer", action="store_true")
    ap.add_argument("--speed-prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large", action="store_true", help="the 134M synthetic checkpoint instead (speed only)")
    ap.add_argument("--large-skips", type=int, nargs="*", default=[0, 3, 6])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dlmc-bench"))
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = large(args) if args.large else embedded(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
