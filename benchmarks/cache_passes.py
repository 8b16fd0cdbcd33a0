"""The acceleration passes against the reference decoder, measured in one run on the same prompts.

    python benchmarks/cache_passes.py                      # embedded model, gen 128, block 32
    python benchmarks/cache_passes.py --synthetic          # 134M LLaDA-format checkpoint, gen 256

Embedded model: every row decodes the same bench prompts with the LLaDA decoder (gen 128, block 32);
"reference" is the eager model at one token per step with no cache, the baseline of every ratio. Each
cache pass runs alone at one token per step, compiled with Inductor; "threshold" is Fast-dLLM's
parallel decoding (confidence 0.9) on the eager model; the combined rows stack them. Accuracy is
exact match on held-out task prompts (`--per-task` of each of the four tasks), agreement is the
fraction of generated tokens equal to the reference decoder's.

Synthetic: random weights, so only cost per step means anything: a fixed number of tokens per step
(gen 256 in 64 steps, block 32), plain compiled step vs each cache pass, same backend.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dlmc.bench import bench_prompts, measure
from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig
from dlmc.evaluate import evaluate
from dlmc.models import load_model
from dlmc.recipe import load_recipe, parse_recipe
from dlmc.runtime import load
from dlmc.testing.fixtures import write_checkpoint

EMBEDDED = Path(__file__).parents[1] / "dlmc" / "data" / "default_model"
RECIPES = Path(__file__).parents[1] / "recipes"

FUSED = [{"fold_constants": {}}, {"fuse_decode": {}}]
DUAL_FUSED = [{"block_cache": {"mode": "dual", "block_length": 32}}, {"fuse_decode": {}}]
# name -> (passes or a recipe file, backend, decoder config overrides); None = the eager reference model
ROWS = {
    "reference": (None, None, {}),
    "compiled": ([{"fold_constants": {}}], "inductor", {}),
    "prefix_cache": ([{"block_cache": {"mode": "prefix", "block_length": 32}}], "inductor", {}),
    "dual_cache": ([{"block_cache": {"mode": "dual", "block_length": 32}}], "inductor", {}),
    "delayed_kv": ([{"delayed_kv": {"refresh": 8, "block_length": 32}}], "inductor", {}),
    "prefill_kv": ([{"delayed_kv": {"mode": "prefill", "refresh": None}}], "inductor", {}),
    "window": ([{"window_pruning": {"window": 32, "block_length": 32}}], "inductor", {}),
    "threshold": (None, None, {"threshold": 0.9}),
    "compiled+thr": (RECIPES / "default-cpu-threshold.yaml", "inductor", {"threshold": 0.9}),  # shipped
    "prefix+thr": (RECIPES / "default-cpu-prefix-threshold.yaml", "inductor", {"threshold": 0.9}),  # shipped
    "dual+thr": ([{"block_cache": {"mode": "dual", "block_length": 32}}], "inductor", {"threshold": 0.9}),
    "delayed+thr": ([{"delayed_kv": {"refresh": 8, "block_length": 32}}], "inductor", {"threshold": 0.9}),
    "window+thr": ([{"window_pruning": {"window": 32, "block_length": 32}}], "inductor", {"threshold": 0.9}),
    # the decoding rule compiled into the step (fuse_decode) and the runtime's fused loop
    "fused": (FUSED, "inductor", {}),
    "fused+thr": (FUSED, "inductor", {"threshold": 0.9}),
    "dual_fused": (DUAL_FUSED, "inductor", {}),
    "dual_fused+thr": (DUAL_FUSED, "inductor", {"threshold": 0.9}),
}
SYNTHETIC_ROWS = ("compiled", "prefix_cache", "dual_cache", "delayed_kv", "window")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", action="store_true", help="the 134M checkpoint, cost per step only")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dlmc-bench-cache"))
    ap.add_argument("--prompts", type=int, default=8, help="bench prompts (one batch)")
    ap.add_argument("--per-task", type=int, default=25, help="held-out prompts per task for accuracy (25: all 100)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="row names to run (reference always runs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.synthetic:
        synthetic(args)
    else:
        embedded(args)


def embedded(args) -> None:
    reference = load_model(EMBEDDED)
    base = LLaDAConfig(gen_length=128, steps=128, block_length=32)
    tokenizer = load(_compile(args, "compiled", EMBEDDED)).tokenizer
    prompts = bench_prompts(reference.spec, tokenizer, args.prompts, seed=0)
    results, reference_ids = [], None
    for name, (passes, backend, overrides) in ROWS.items():
        if args.only and name != "reference" and name not in args.only:
            continue
        model = reference if passes is None else load(_compile(args, name, EMBEDDED))
        config = LLaDAConfig(**{**asdict(base), **overrides})
        m = measure(name, model, reference.spec, prompts, "llada", config, reference=reference_ids,
                    repeats=args.repeats)
        reference_ids = reference_ids or m.output_ids
        report = evaluate(model, reference.spec, tokenizer, "llada", config, per_task=args.per_task)
        results.append({**m.row(), "accuracy": report.accuracy, "per_task": report.per_task})
        print(json.dumps(results[-1]), flush=True)
    print_table(results, "reference")


def synthetic(args) -> None:
    model_dir = args.workdir / "llada-134m"
    if not (model_dir / "config.json").is_file():
        # 12 x (4 * 768^2 + 3 * 768 * 2048) + 2 * 32000 * 768 = 134M parameters
        write_checkpoint("llada", model_dir, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048,
                         vocab=32000, max_length=512, shards=3)
    config = LLaDAConfig(gen_length=256, steps=64, block_length=32)  # 4 tokens per step, 8 steps per block
    results, reference_ids, spec = [], None, None
    for name in SYNTHETIC_ROWS:
        if args.only and name not in args.only and name != "compiled":
            continue
        engine = load(_compile(args, name, model_dir))
        spec = engine.spec
        prompts = bench_prompts(spec, None, args.prompts, seed=0)
        m = measure(name, engine, spec, prompts, "llada", config, reference=reference_ids, repeats=args.repeats)
        reference_ids = reference_ids or m.output_ids
        results.append(m.row())
        print(json.dumps(results[-1]), flush=True)
    print_table(results, "compiled")


def _compile(args, name: str, model_dir: Path) -> Path:
    passes, backend, _ = ROWS[name]
    out = args.workdir / f"{model_dir.name}-{name}"
    if not (out / "manifest.json").is_file():
        start = time.perf_counter()
        if isinstance(passes, Path):
            recipe = load_recipe(passes)
        else:
            recipe = parse_recipe({"passes": passes, "lower": {"backend": backend}}, name)
        compile_model(model_dir, recipe, out, force=True)
        print(f"compiled {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def print_table(results: list[dict], baseline: str) -> None:
    base = next(r for r in results if r["name"] == baseline)
    header = "| row | tok/s | speed-up | s/step | NFE | peak MB | agreement |" + (" accuracy |" if "accuracy" in base else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        line = (
            f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['seconds_per_step']:.4f} | {r['nfe']} | {r['peak_memory_mb']:.0f} | {r['agreement']:.1%} |"
        )
        if "accuracy" in r:
            line += f" {r['accuracy']:.1%} |"
        print(line)


if __name__ == "__main__":
    main()
