"""Calibrated layer skipping: quality and speed against the number of skipped layers, in one run.

    python benchmarks/layer_skip.py [--per-task 25] [--skips 0 1 2 3] [--every-single-layer]
    python benchmarks/layer_skip.py --large [--large-skips 0 3 6] [--workdir /tmp/dlmc-bench]

Embedded model (4 layers): for each k and each criterion (similarity: the paper's cos(h_in, h_out);
logits: greedy on the arg-max tokens at masked positions), compile with fold_constants + layer_skip
{budget: k, criterion: ...} (calibrated at compile time; k = 0 is the same recipe without
layer_skip) on AOTInductor, then
decode the held-out task prompts with the reference LLaDA decoder settings of `dlmc eval
--block-length 32` (generation length 128, one token per step) on the artifact. Reported: the layers
calibration chose, task accuracy, token agreement with the reference decoder on the eager
checkpoint (same prompts, same decoder), and the median seconds per step and tokens/s of
`--speed-prompts` prompts, with ratios against the k = 0 artifact and the reference decoder, all
measured in this run, in interleaved rounds (every model once per round) so that load from other
processes falls on all of them alike. `--every-single-layer` adds each single-layer skip chosen by hand, to show
whether calibration picks the best one.

`--large`: a random LLaDA-format checkpoint of 134M parameters (hidden 768, 12 layers, as in
benchmarks/compile_ratio.py); random weights make accuracy meaningless, so only speed is reported
(generation length 256, 16 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dlmc.runtime
from dlmc.bench import bench_prompts, token_agreement
from dlmc.decoding import DECODERS
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


def recipe_for(skip: int | None = None, layers: tuple[int, ...] | None = None, criterion: str = "similarity") -> Recipe:
    passes = [FoldConstants()]
    if skip:
        passes.append(LayerSkip(budget=skip, criterion=criterion))
    if layers is not None:
        passes.append(LayerSkip(layers=layers))
    return Recipe(capture=CaptureConfig(dtype="float32"), passes=tuple(passes), lower=InductorSettings(),
                  description="benchmarks/layer_skip.py")


def compiled(model_dir: Path, recipe: Recipe, out: Path):
    compile_model(model_dir, recipe, out, force=True)
    engine = dlmc.runtime.load(out)
    passes = engine.manifest["recipe"]["passes"]
    return engine, next((p["layer_skip"]["layers"] for p in passes if "layer_skip" in p), [])


def interleaved_speed(models: dict[str, object], spec, prompts, config, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds per step, median tokens/s). One warm-up each, then `repeats` rounds
    that time every model once, so load from other processes on the machine spreads evenly."""
    times: dict[str, list[float]] = {name: [] for name in models}
    nfe = {}
    with torch.inference_mode():
        for name, model in models.items():
            nfe[name] = DECODERS["llada"][1](model, spec, prompts, config, seed=0).nfe
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                DECODERS["llada"][1](model, spec, prompts, config, seed=0)
                times[name].append(time.perf_counter() - start)
    tokens = len(prompts) * config.gen_length
    return {name: (statistics.median(t) / nfe[name], tokens / statistics.median(t)) for name, t in times.items()}


def embedded(args: argparse.Namespace) -> list[dict]:
    model_dir = default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    reference = load_model(model_dir)
    config = LLaDAConfig(gen_length=128, steps=128, block_length=32)
    eval_args = dict(per_task=args.per_task, batch_size=25)

    ref_eval = evaluate(reference, reference.spec, tokenizer, "llada", config, **eval_args)
    ref_ids = [c.output_ids for c in ref_eval.completions]
    rows = [{"name": "reference (eager, all layers)", "layers": [], "parameters": reference.num_parameters(),
             "accuracy": ref_eval.accuracy, "per_task": ref_eval.per_task, "agreement": 1.0}]
    models = {rows[0]["name"]: reference}
    print(f"reference: accuracy {ref_eval.accuracy:.1%} of {ref_eval.examples}", flush=True)

    runs = [(f"skip {k}" + (f" ({c})" if k else ""), recipe_for(skip=k, criterion=c))
            for c in args.criteria for k in args.skips if k or c == args.criteria[0]]
    chosen: set[int] = set()
    for name, recipe in runs:
        engine, layers = compiled(model_dir, recipe, args.workdir / f"layer-skip-{len(models)}")
        chosen |= set(layers) if len(layers) == 1 else set()
        rows.append(quality_row(name, engine, layers, tokenizer, config, eval_args, ref_ids))
        models[name] = engine
    if args.every_single_layer:  # single layers by hand that calibration did not already pick
        for i in sorted(set(range(reference.arch.num_layers)) - chosen):
            name = f"layer {i} by hand"
            engine, layers = compiled(model_dir, recipe_for(layers=(i,)), args.workdir / f"layer-skip-{len(models)}")
            rows.append(quality_row(name, engine, layers, tokenizer, config, eval_args, ref_ids))
            models[name] = engine

    prompts = bench_prompts(reference.spec, tokenizer, args.speed_prompts, seed=0)
    speed = interleaved_speed(models, reference.spec, prompts, config, args.repeats)
    for row in rows:
        row["s_per_step"], row["tok_per_s"] = speed[row["name"]]
    print(f"\nembedded model: {ref_eval.examples} held-out prompts (the settings of dlmc eval --block-length 32); "
          f"speed: {len(prompts)} prompts, median of {args.repeats} interleaved rounds")
    print(table(rows, base="skip 0"))
    return rows


def quality_row(name, engine, layers, tokenizer, config, eval_args, ref_ids) -> dict:
    report = evaluate(engine, engine.spec, tokenizer, "llada", config, **eval_args)
    row = {"name": name, "layers": layers, "parameters": engine.manifest["model"]["parameters"],
           "accuracy": report.accuracy, "per_task": report.per_task,
           "agreement": token_agreement([c.output_ids for c in report.completions], ref_ids)}
    print(f"{name}: layers {layers}, accuracy {report.accuracy:.1%} {report.per_task}, "
          f"agreement {row['agreement']:.1%}", flush=True)
    return row


def large(args: argparse.Namespace) -> list[dict]:
    model_dir = args.workdir / "llada-134m"
    if not (model_dir / "config.json").is_file():
        write_checkpoint("llada", model_dir, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048,
                         vocab=32000, max_length=512, shards=3)
    reference = load_model(model_dir)
    config = LLaDAConfig(gen_length=256, steps=16)
    prompts = bench_prompts(reference.spec, load_tokenizer(model_dir), 1, seed=0)
    rows = [{"name": "reference (eager, all layers)", "layers": [], "parameters": reference.num_parameters()}]
    models = {rows[0]["name"]: reference}
    for k in args.large_skips:
        engine, layers = compiled(model_dir, recipe_for(skip=k, criterion=args.criteria[0]),
                                  args.workdir / f"layer-skip-large-{k}")
        rows.append({"name": f"skip {k}", "layers": layers, "parameters": engine.manifest["model"]["parameters"]})
        models[f"skip {k}"] = engine
        print(f"skip {k}: layers {layers}", flush=True)
    with torch.inference_mode():
        outputs = {name: DECODERS["llada"][1](m, reference.spec, prompts, config, seed=0).output_ids
                   for name, m in models.items()}
    speed = interleaved_speed(models, reference.spec, prompts, config, args.repeats)
    for row in rows:
        row["agreement"] = token_agreement(outputs[row["name"]], outputs[rows[0]["name"]])
        row["s_per_step"], row["tok_per_s"] = speed[row["name"]]
    print(f"\n134M random LLaDA checkpoint, 1 prompt, generation length 256, 16 steps (speed only), "
          f"median of {args.repeats} interleaved rounds:")
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
    ap.add_argument("--criteria", nargs="*", default=["similarity", "logits"], choices=["similarity", "logits"])
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
