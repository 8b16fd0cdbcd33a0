"""Artifact vs reference decoder on a synthetic LLaDA-format checkpoint with >= 100M parameters.

    python benchmarks/compile_ratio.py [--workdir /tmp/dlmc-bench] [--steps 16] [--repeats 1]

Random weights, generation length 256, a fixed number of tokens per step (gen_length / steps), so
the per-step cost of each backend is what is measured. For every (backend, dtype) the reference
decoder runs on the eager model in the same dtype and the same decoder runs on the compiled step, in
one process, one after the other; the table gives the artifact / reference ratio of tokens/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from dlmc.bench import run_bench
from dlmc.compiler import compile_model
from dlmc.errors import DlmcError
from dlmc.recipe import parse_recipe
from dlmc.testing.fixtures import write_checkpoint

RECIPES = Path(__file__).parents[1] / "recipes"
TARGETS = [("inductor", "float32"), ("inductor", "bfloat16"), ("inductor", "mixed_bf16"), ("onnxrt", "float32"),
           ("onnxrt", "bfloat16"), ("onnxrt", "mixed_bf16")]
"""(backend, dtype): `mixed_bf16` keeps the checkpoint in fp32 and adds the mixed_precision pass (bf16
matmul weights, fp32 norms, softmax and logits); it is approximate, so its reference is fp32."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dlmc-bench"))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="backend-dtype names to run, e.g. inductor-mixed_bf16")
    args = ap.parse_args()
    model_dir = args.workdir / "llada-134m"
    if not (model_dir / "config.json").is_file():
        # 12 x (4 * 768^2 + 3 * 768 * 2048) + 2 * 32000 * 768 = 134M parameters
        write_checkpoint("llada", model_dir, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048,
                         vocab=32000, max_length=512, shards=3)
    results = []
    for backend, dtype in TARGETS:
        if args.only and f"{backend}-{dtype}" not in args.only:
            continue
        data = yaml.safe_load((RECIPES / f"cpu-{backend}.yaml").read_text())
        if dtype == "mixed_bf16":
            data["capture"]["dtype"] = "float32"
            data["passes"].append({"mixed_precision": {"dtype": "bfloat16"}})
        else:
            data["capture"]["dtype"] = dtype
        data["description"] = f"{backend} {dtype} (benchmarks/compile_ratio.py)"
        out = args.workdir / f"{backend}-{dtype}"
        start = time.perf_counter()
        try:
            compile_model(model_dir, parse_recipe(data, "bench"), out, force=True)
        except DlmcError as e:
            print(f"{backend} {dtype}: not compiled: {e}", flush=True)
            results.append({"backend": backend, "dtype": dtype, "error": str(e)})
            continue
        compile_s = time.perf_counter() - start
        report = run_bench(out, model_dir, prompts=args.prompts, options={"gen_length": 256, "steps": args.steps},
                           repeats=args.repeats, seed=0)
        ref, art = report["rows"]
        row = {"backend": backend, "dtype": dtype, "compile_s": round(compile_s, 1),
               "reference_s_per_step": ref["seconds_per_step"], "artifact_s_per_step": art["seconds_per_step"],
               "ratio": art["tokens_per_s"] / ref["tokens_per_s"], "agreement": art["agreement"], "nfe": art["nfe"],
               "reference_peak_mb": ref["peak_memory_mb"], "artifact_peak_mb": art["peak_memory_mb"]}
        results.append(row)
        print(f"{backend} {dtype}\n{report['table']}\n", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
