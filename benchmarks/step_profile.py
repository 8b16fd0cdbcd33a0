"""Per-operator time of the dual-cache step (recipes/cpu-bf16-dual.yaml), next to its floor.

    python benchmarks/step_profile.py [--model 134m|default] [--inductor] [--top 15]

AOTInductor's shared library is opaque to torch.profiler, so this profiles the program the artifact is
compiled from (captured in bf16, after the recipe's passes and the CPU lowering's `materialize_tables`),
run (a) eagerly, op by op, and (b) with `--inductor` through torch.compile with dynamic shapes (Inductor,
the same code generator AOTInductor uses; its generated C++ kernels appear by name). Inputs are those of
benchmarks/step_floor.py: the first generated block's rows of a prompt + gen canvas, every other column from
a random K/V cache.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import dlmc.runtime
from dlmc.capture import capture
from dlmc.decoding.llada import LLaDAConfig
from dlmc.generation import default_model_dir
from dlmc.models import load_model, read_model_config
from dlmc.lower.materialize import materialize_tables
from dlmc.pipeline import run_passes
from dlmc.recipe import load_recipe
from dlmc.testing.fixtures import write_checkpoint
from step_floor import RECIPES, Sizes, canvas, median_ms, step_inputs

GROUPS = {  # aten op -> what it is in the step; anything else is "other"
    "aten::mm": "GEMM", "aten::addmm": "GEMM", "aten::linear": "GEMM", "aten::matmul": "GEMM", "aten::bmm": "GEMM",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_attention_math": "attention", "aten::_softmax": "softmax",
    "aten::argmax": "argmax", "aten::index": "index", "aten::_index_put_impl_": "index",
    "aten::cat": "cat", "aten::copy_": "copy", "aten::clone": "copy", "aten::contiguous": "copy",
    "aten::_to_copy": "dtype cast", "aten::mul": "mul/add", "aten::add": "mul/add", "aten::neg": "mul/add",
    "aten::rsqrt": "norm", "aten::pow": "norm", "aten::mean": "norm", "aten::silu": "silu",
    "aten::embedding": "embedding", "aten::index_select": "embedding", "aten::stack": "cat",
}


def profile_ops(fn, calls: int) -> list[tuple[str, float, int]]:
    """(name, ms per step of self CPU time, calls per step) of every op, slowest first."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    ops = [(e.key, e.self_cpu_time_total / 1e3 / calls, e.count // calls) for e in prof.key_averages()]
    return sorted((op for op in ops if op[1] > 0), key=lambda op: -op[1])


def group_of(name: str) -> str:
    if name in GROUPS:
        return GROUPS[name]
    if "cpp_fused" in name or name.startswith("graph_"):
        return "inductor kernel"
    if "mkldnn" in name or "onednn" in name or "_linear_pointwise" in name or "_weight_int" in name:
        return "GEMM"
    return "other"


def report(title: str, ops: list[tuple[str, float, int]], wall_ms: float, top: int) -> str:
    total = sum(ms for _, ms, _ in ops)
    lines = [f"\n{title}: {wall_ms:.2f} ms per step unprofiled; profiled self time {total:.2f} ms",
             f"  {'op':62} {'ms':>8} {'share':>6} {'calls':>6}"]
    for name, ms, count in ops[:top]:
        lines.append(f"  {name[:62]:62} {ms:8.3f} {ms / total:6.1%} {count:6d}")
    groups: dict[str, float] = defaultdict(float)
    for name, ms, _ in ops:
        groups[group_of(name)] += ms
    lines.append("  by group: " + ", ".join(f"{g} {ms:.2f} ms ({ms / total:.0%})"
                                           for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dlmc-floor"))
    ap.add_argument("--model", choices=["134m", "default"], default="134m")
    ap.add_argument("--recipe", default="cpu-bf16-dual")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: on a shared 2-core machine a "
                    "second OpenMP thread waits on a descheduled peer and GEMMs run 10-100x slower)")
    ap.add_argument("--inductor", action="store_true", help="also profile torch.compile (Inductor) of the program")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--decode", action="store_true",
                    help="also profile engine.generate over one block, on the artifact step_floor.py compiled")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = default_model_dir() if args.model == "default" else args.workdir / "llada-134m"
    if args.model == "134m" and not (model_dir / "config.json").is_file():
        write_checkpoint("llada", model_dir, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048,
                         vocab=32000, max_length=512, shards=3, dtype=torch.bfloat16)
    recipe = load_recipe(RECIPES / f"{args.recipe}.yaml")
    _, _, spec = read_model_config(model_dir)
    sizes = Sizes(prompt=args.prompt, gen=args.gen).fit(spec.max_length)
    model = load_model(model_dir, dtype=getattr(torch, recipe.capture.dtype))
    # as dlmc's inductor lowering does on the CPU: RoPE's tables computed once, not in every layer
    program = materialize_tables(run_passes(capture(model, recipe.capture), recipe.passes))
    ids, block = canvas(spec, sizes)
    query = block if program.signature.cache is not None else torch.ones_like(block)
    inputs = step_inputs(program.signature, ids, query, sizes.block)
    print(f"{args.model} {args.recipe}: {int(query.sum())} query rows x {len(ids)} keys, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)

    with torch.inference_mode():
        run = lambda: program.module(*inputs)  # noqa: E731
        print(report("eager (the captured program after passes)", profile_ops(run, args.calls),
                     median_ms(run, args.calls), args.top), flush=True)
        if args.inductor:
            profile_inductor(program.module, inputs, args.calls, args.top)
    if args.decode:
        profile_decode(args.workdir / f"{args.model}-{args.recipe}", ids, sizes, args.top)


def profile_inductor(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], calls: int, top: int) -> None:
    """The same program through torch.compile, then again with freezing, and how far freezing moves it."""
    torch._inductor.config.cpp.enable_kernel_profile = True  # name each generated kernel in the profile
    # dynamic shapes, as AOTInductor compiles an artifact (its batch and sequence stay run-time sizes)
    compiled = torch.compile(module, dynamic=True)
    run = lambda: compiled(*inputs)  # noqa: E731
    print(report("torch.compile (Inductor)", profile_ops(run, calls), median_ms(run, calls), top), flush=True)
    expected = run()[0].float()  # [1, Q, V]
    # Freezing: weights become constants that Inductor prepacks for oneDNN once, instead of per call.
    torch._dynamo.reset()
    torch._inductor.config.freezing = True
    frozen = torch.compile(module, dynamic=True)
    run = lambda: frozen(*inputs)  # noqa: E731
    logits = run()[0].float()
    moved = ((logits - expected).abs() / (1 + expected.abs())).max().item()  # as dlmc's verify stage measures
    same = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    title = f"torch.compile with freezing (logits vs unfrozen: max rel. diff {moved:.3g}, same arg-max {same:.1%})"
    print(report(title, profile_ops(run, calls), median_ms(run, calls), top), flush=True)


def profile_decode(artifact: Path, ids: torch.Tensor, sizes: Sizes, top: int) -> None:
    """What the runtime adds around the compiled step: `engine.generate` over one block, one token per step,
    on the artifact benchmarks/step_floor.py compiled; then the decoder's arg-max over the canvas's logits."""
    if not (artifact / "manifest.json").is_file():
        raise SystemExit(f"{artifact}: not compiled; run benchmarks/step_floor.py first")
    engine = dlmc.runtime.load(artifact)
    prompts = [ids[: len(ids) - sizes.block].tolist()]  # the same canvas length: all but the last block
    config = LLaDAConfig(gen_length=sizes.block, steps=sizes.block, block_length=sizes.block)
    run = lambda: engine.generate(prompts, "llada", config)  # noqa: E731
    ops = [(name, ms / sizes.block, count) for name, ms, count in profile_ops(run, 1)]
    title = (f"engine.generate, llada decoder, one block of {sizes.block} steps (1 full + {sizes.block - 1} dual; "
             "calls per block)")
    print(report(title, ops, median_ms(run, 1, 0) / sizes.block, top), flush=True)
    logits = torch.randn(len(ids), engine.spec.vocab_size).to(torch.bfloat16)  # [L, V]: the decoder's per-step input
    argmax = median_ms(lambda: logits.argmax(-1), 5)
    via_max = median_ms(lambda: logits.max(-1).indices, 5)
    block = median_ms(lambda: logits[: sizes.block].argmax(-1), 5)
    same = torch.equal(logits.argmax(-1), logits.max(-1).indices)
    print(f"  arg-max over {list(logits.shape)} bf16: argmax {argmax:.2f} ms, max(-1).indices {via_max:.2f} ms "
          f"(same indices: {same}); over the block's {sizes.block} rows: {block:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
