"""How far one compiled denoising step, and one whole decode iteration, are from this machine's floor.

    python benchmarks/step_floor.py [--workdir /tmp/dlmc-floor] [--json floor.json] [--quick]

In one run: this CPU's bf16/fp32 GEMM rates at the shapes a step really runs and its copy bandwidth;
the floor of each step, max(FLOPs at those rates, bytes read once / bandwidth); then the 134M
LLaDA-format checkpoint of benchmarks/compile_ratio.py (stored in bf16) and the embedded default model,
each compiled with recipes/cpu-bf16.yaml (the full step over the whole canvas) and
recipes/cpu-bf16-dual.yaml (Fast-dLLM dual cache: the block's rows over the whole canvas's keys), and
each recipe in the variants of DROPPED: without fuse_decode, cpu_attention and `freeze` (the baseline: the
reference decoder on the unfrozen step's full-canvas logits), fused but unfrozen (what freezing adds), and
fused and frozen on ATen's attention (what dlmc's CPU attention kernel adds). For each: the compiled step
alone (`engine.run_step`, median of --calls) and the whole decode (llada decoder, temperature 0) in ms per
model call. Every number comes from this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig
from dlmc.generation import default_model_dir
from dlmc.recipe import load_recipe
from dlmc.models import read_model_config
from dlmc.models.transformer import ArchConfig
from dlmc.runtime.cache import empty_cache
from dlmc.testing.fixtures import write_checkpoint

RECIPES = Path(__file__).parents[1] / "recipes"
ARTIFACTS = {"full": "cpu-bf16", "dual": "cpu-bf16-dual"}  # step kind -> recipe
VARIANTS = ("unfused", "unfrozen", "sdpa", "recipe")
DROPPED = {"unfused": ("fuse_decode", "cpu_attention"), "unfrozen": ("cpu_attention",), "sdpa": ("cpu_attention",),
           "recipe": ()}
"""Variant -> the recipe's passes it drops: the baseline (the reference decoder on the full-canvas logits of an
unfrozen step), fused but unfrozen (what freezing adds), fused and frozen on ATen's attention (what dlmc's CPU
attention kernel adds), and the recipe as shipped."""


@dataclass(frozen=True)
class Sizes:
    prompt: int = 256
    gen: int = 256
    block: int = 32
    full_steps: int = 32
    """Decode steps for the full-step artifact (gen / full_steps tokens per step, to keep it short)."""
    calls: int = 20
    """Step calls per median."""

    def fit(self, max_length: int) -> Sizes:
        """Halve prompt and generation until the canvas fits the model (the embedded one has 256)."""
        sizes = self
        while sizes.prompt + sizes.gen > max_length:
            sizes = replace(sizes, prompt=sizes.prompt // 2, gen=max(sizes.block, sizes.gen // 2))
        return sizes


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    has = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    missing = [f for f in ("avx512_bf16", "amx_bf16") if f not in flags]
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} {torch.get_num_threads()} threads; "
            f"flags: {' '.join(has)}; no {' '.join(missing) or '-'}; load avg {os.getloadavg()[0]:.2f}")


def median_ms(fn, calls: int, budget_s: float = 2.0) -> float:
    """Median wall time of fn() in ms after one warm-up; fewer calls when one is slow (>= 3)."""
    fn()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(max(3, min(calls, int(budget_s / max(first, 1e-6))))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def gemm_ms(m: int, n: int, k: int, dtype: torch.dtype, calls: int) -> float:
    a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)  # a [M, K] @ w[N, K]^T, as nn.Linear
    return median_ms(lambda: F.linear(a, w), calls)


def bandwidth_gbs(calls: int, mib: int = 512) -> float:
    """Copy of a tensor far larger than the caches, counting read + write."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), calls)
    return 2 * src.numel() * 4 / (ms * 1e6)


def linears(arch: ArchConfig) -> list[tuple[str, int, int, int]]:
    """(name, N, K, count) of every GEMM with a weight in one step: count copies of [M, K] @ [N, K]^T."""
    d, f, L = arch.hidden_size, arch.intermediate_size, arch.num_layers
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return [("q", q, d, L), ("k", kv, d, L), ("v", kv, d, L), ("o", d, q, L), ("gate", f, d, L), ("up", f, d, L),
            ("down", d, f, L), ("head", arch.vocab_size, d, 1)]


@dataclass(frozen=True)
class Rates:
    """Measured GEMM ms per (dtype, M, N, K), the bf16 peak rate, and the copy bandwidth."""

    ms: dict[tuple[str, int, int, int], float]
    peak_gflops: float
    bandwidth_gbs: float

    def table(self) -> list[dict]:
        return [{"dtype": dt, "M": m, "N": n, "K": k, "ms": round(ms, 4), "gflops": round(2 * m * n * k / ms / 1e6, 1),
                 "weight_gbs": round(n * k * (2 if dt == "bfloat16" else 4) / ms / 1e6, 1)}
                for (dt, m, n, k), ms in self.ms.items()]


def measure_rates(shapes: set[tuple[int, int, int]], fp32: set[tuple[int, int, int]], calls: int) -> Rates:
    ms = {("bfloat16", *s): gemm_ms(*s, torch.bfloat16, calls) for s in sorted(shapes)}
    ms |= {("float32", *s): gemm_ms(*s, torch.float32, calls) for s in sorted(fp32)}
    peak = max(2 * m * n * k / t / 1e6 for (dt, m, n, k), t in ms.items() if dt == "bfloat16")
    return Rates(ms, peak, bandwidth_gbs(calls))


# ---------------------------------------------------------------------------------------------
# the floor of one step
# ---------------------------------------------------------------------------------------------


def step_kernels_ms(arch: ArchConfig, rows: int, keys: int, calls: int) -> dict:
    """The step's two big kernels as it runs them, in isolation: every weight GEMM in sequence with its
    own (cold, streamed from memory) bf16 weight, and SDPA per layer with a bool [1, 1, rows, keys] mask."""
    weights = [torch.randn(n, k).to(torch.bfloat16) for _, n, k, count in linears(arch) for _ in range(count)]
    inputs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in {w.shape[1] for w in weights}}  # [rows, K]
    gemms = median_ms(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], calls)
    del weights
    q = torch.randn(1, arch.num_heads, rows, arch.head_dim).to(torch.bfloat16)  # [1, H, rows, D]
    kv = torch.randn(1, arch.num_heads, keys, arch.head_dim).to(torch.bfloat16)  # [1, H, keys, D]
    mask = torch.ones(1, 1, rows, keys, dtype=torch.bool)
    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask), calls)
    unmasked = median_ms(lambda: F.scaled_dot_product_attention(q, kv, kv), calls)  # is it the mask?
    flops = 4 * rows * keys * arch.num_heads * arch.head_dim
    return {"gemms_cold_ms": round(gemms, 3), "attention_ms": round(arch.num_layers * sdpa, 3),
            "attention_gflops": round(flops / sdpa / 1e6, 1),
            "attention_no_mask_ms": round(arch.num_layers * unmasked, 3)}


def floor(arch: ArchConfig, rows: int, keys: int, rates: Rates, head_rows: int) -> dict:
    """max(compute, memory) for one bf16 step: `rows` query rows attending to `keys` key columns, the
    output head on the `head_rows` rows that can be committed (the job; an unfused step does more).

    Compute: every weight GEMM at the rate measured for its own [M, N, K] shape, plus attention's
    QK^T and PV at the peak rate. Memory: every weight once (bf16) plus the cached K/V read once."""
    m = {name: head_rows if name == "head" else rows for name, *_ in linears(arch)}
    gemm = sum(count * rates.ms["bfloat16", m[name], n, k] for name, n, k, count in linears(arch))
    attn_flops = arch.num_layers * 4 * rows * keys * arch.num_heads * arch.head_dim
    compute_ms = gemm + attn_flops / rates.peak_gflops / 1e6
    flops = sum(2 * m[name] * n * k * count for name, n, k, count in linears(arch)) + attn_flops
    cached = keys - rows
    weight_bytes = 2 * sum(n * k * count for _, n, k, count in linears(arch))
    kv_bytes = 2 * 2 * arch.num_layers * cached * arch.num_kv_heads * arch.head_dim
    memory_ms = (weight_bytes + kv_bytes) / rates.bandwidth_gbs / 1e6
    return {"rows": rows, "keys": keys, "gflop": round(flops / 1e9, 2),
            "mbytes": round((weight_bytes + kv_bytes) / 1e6, 1),
            "compute_ms": round(compute_ms, 3), "compute_at_peak_ms": round(flops / rates.peak_gflops / 1e6, 3),
            "memory_ms": round(memory_ms, 3), "floor_ms": round(max(compute_ms, memory_ms), 3),
            "binds": "compute" if compute_ms >= memory_ms else "memory"}


# ---------------------------------------------------------------------------------------------
# the compiled step and the whole iteration
# ---------------------------------------------------------------------------------------------


def canvas(spec, sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """A random canvas ids [L] (no special tokens) and the dual step's query columns [L] bool: the first
    generated block (for shifted logits also the row before it, which predicts its first token)."""
    length = sizes.prompt + sizes.gen
    special = {spec.mask_token_id, spec.eos_token_id, spec.pad_token_id, spec.eot_token_id}
    pool = torch.tensor([i for i in range(spec.vocab_size) if i not in special])
    ids = pool[torch.randint(len(pool), (length,), generator=torch.Generator().manual_seed(0))]  # [L] int64
    block = torch.zeros(length, dtype=torch.bool)
    block[sizes.prompt - int(spec.shift_logits) : sizes.prompt + sizes.block] = True
    return ids, block


def step_inputs(signature, ids: torch.Tensor, query: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """The step's inputs for one canvas `ids` [L] whose columns `query` [L] bool are computed now; the rest
    come from a cache of random K/V, as CacheManager._run lays them out (a plain step: all columns)."""
    q_pos, c_pos = query.nonzero().squeeze(1), (~query).nonzero().squeeze(1)  # [Q], [C] int64
    inputs = (ids[q_pos][None], torch.ones(1, len(q_pos), dtype=torch.bool), q_pos[None])  # each [1, Q]
    if signature.cache is not None and not len(c_pos):  # nothing cached: one masked-out key, as the runtime feeds it
        inputs += empty_cache(signature, 1)
    elif signature.cache is not None:
        spec = next(t for t in signature.inputs if t.name == "cache_keys")
        layers, _, kv_heads, _, head_dim = spec.shape
        kv = torch.randn(layers, 1, kv_heads, len(c_pos), head_dim).to(getattr(torch, spec.dtype))  # [N, 1, H, C, D]
        inputs += (torch.ones(1, len(c_pos), dtype=torch.bool), c_pos[None], kv, kv.clone())
    if signature.fused:  # the output head runs on the rows of one block (the last `block` rows queried)
        inputs += (torch.arange(len(q_pos) - block, len(q_pos))[None],)
    return inputs


def step_ms(engine, inputs: tuple[torch.Tensor, ...], calls: int) -> float:
    with torch.inference_mode():
        return median_ms(lambda: engine.run_step(*inputs), calls)


def decode_ms_per_step(engine, prompts: list[list[int]], config: LLaDAConfig) -> tuple[float, int]:
    """The whole denoising iteration as the runtime does it today: ms per model call, and the calls.

    Point this at a fused runtime loop to compare it on the same rows."""
    with torch.inference_mode():
        start = time.perf_counter()
        result = engine.generate(prompts, "llada", config)
        seconds = time.perf_counter() - start
    return 1e3 * seconds / result.nfe, result.nfe


def bench_model(name: str, model_dir: Path, args, sizes: Sizes, rates: Rates) -> list[dict]:
    _, arch, spec = read_model_config(model_dir)
    ids, block = canvas(spec, sizes)
    length, prompts = len(ids), [ids[: sizes.prompt].tolist()]
    rows = []
    for (kind, recipe), variant in itertools.product(ARTIFACTS.items(), args.variants):
        label = recipe if variant == "recipe" else f"{recipe} {variant}"
        out = args.workdir / f"{name}-{label.replace(' ', '-')}"
        start = time.perf_counter()
        if not (args.reuse and (out / "manifest.json").is_file()):
            resolved = load_recipe(RECIPES / f"{recipe}.yaml")
            if variant in ("unfused", "unfrozen"):
                resolved = dataclasses.replace(resolved, lower=dataclasses.replace(resolved.lower, freeze=False))
            kept = tuple(p for p in resolved.passes if p.name not in DROPPED[variant])
            resolved = dataclasses.replace(resolved, passes=kept)
            compile_model(model_dir, resolved, out, force=True)
        compile_s = time.perf_counter() - start
        engine = dlmc.runtime.load(out)
        warm = LLaDAConfig(gen_length=sizes.block, steps=2, block_length=sizes.block)
        decode_ms_per_step(engine, prompts, warm)  # loads kernels, sizes the allocator
        full = step_ms(engine, step_inputs(engine.signature, ids, torch.ones(length, dtype=torch.bool), sizes.block), sizes.calls)
        steps = sizes.full_steps if kind == "full" else sizes.gen
        config = LLaDAConfig(gen_length=sizes.gen, steps=steps, block_length=sizes.block, temperature=0.0)
        decode_ms, nfe = decode_ms_per_step(engine, prompts, config)
        full_floor = floor(arch, length, length, rates, sizes.block)["floor_ms"]
        if kind == "full":
            step, calls_ms, query = full, full, length
        else:  # each block's first call is a full step (refreshing the cache), the others the block's rows
            step = step_ms(engine, step_inputs(engine.signature, ids, block, sizes.block), sizes.calls)
            starts = sizes.gen // sizes.block
            calls_ms = (starts * full + (nfe - starts) * step) / nfe
            query = int(block.sum())
        bound = floor(arch, query, length, rates, sizes.block) | step_kernels_ms(arch, query, length, sizes.calls)
        # the whole iteration's floor: its calls' floors, the dual cache's full refresh steps included
        starts = 0 if kind == "full" else sizes.gen // sizes.block
        iteration_floor = (starts * full_floor + (nfe - starts) * bound["floor_ms"]) / nfe
        rows.append({"artifact": f"{name} {label}", "kind": kind, "rows_x_keys": f"{query}x{length}",
                     "compile_s": round(compile_s, 1), "step_ms": round(step, 3), "full_step_ms": round(full, 3),
                     "decode_ms_per_step": round(decode_ms, 3), "nfe": nfe,
                     "overhead_ms": round(decode_ms - calls_ms, 3), "floor": bound,
                     "ratio": round(step / bound["floor_ms"], 2), "iteration_floor_ms": round(iteration_floor, 3),
                     "decode_ratio": round(decode_ms / iteration_floor, 2), "sizes": asdict(sizes)})
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'artifact':30} {'rows x keys':>11} {'step ms':>8} {'decode ms/step':>14} {'overhead':>8} "
          f"{'floor ms':>8} {'binds':>7} {'step/floor':>10} {'GEMM+SDPA':>9} {'iter floor':>10} {'decode/floor':>12}")


def format_row(r: dict) -> str:
    f = r["floor"]
    return (f"{r['artifact']:30} {r['rows_x_keys']:>11} {r['step_ms']:8.2f} {r['decode_ms_per_step']:14.2f} "
            f"{r['overhead_ms']:8.2f} {f['floor_ms']:8.2f} {f['binds']:>7} {r['ratio']:9.2f}x "
            f"{f['gemms_cold_ms'] + f['attention_ms']:9.2f} {r['iteration_floor_ms']:10.2f} {r['decode_ratio']:11.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dlmc-floor"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32, help="the dual recipe's block_length")
    ap.add_argument("--full-steps", type=int, default=32, help="decode steps of the full-step artifact")
    ap.add_argument("--calls", type=int, default=20, help="calls per median")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: on a shared 2-core machine a "
                    "second OpenMP thread waits on a descheduled peer and GEMMs run 10-100x slower)")
    ap.add_argument("--models", nargs="*", default=["134m", "default"], choices=["134m", "default"])
    ap.add_argument("--reuse", action="store_true", help="keep artifacts already in --workdir")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS,
                    help="unfused: no fuse_decode, no freeze, ATen attention (the baseline); unfrozen: fused, no "
                         "freeze; sdpa: fused, frozen, ATen attention; recipe: as shipped")
    ap.add_argument("--quick", action="store_true", help="embedded model only, short canvas, few calls")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = Sizes(args.prompt, args.gen, args.block, args.full_steps, args.calls)
    if args.quick:
        sizes, args.models = Sizes(prompt=64, gen=64, block=32, full_steps=8, calls=5), ["default"]
    models = {}
    if "134m" in args.models:
        models["134m"] = args.workdir / "llada-134m"
        if not (models["134m"] / "config.json").is_file():
            # 12 x (4 * 768^2 + 3 * 768 * 2048) + 2 * 32000 * 768 = 134M parameters
            write_checkpoint("llada", models["134m"], hidden=768, layers=12, heads=12, kv_heads=12,
                             intermediate=2048, vocab=32000, max_length=512, shards=3, dtype=torch.bfloat16)
    if "default" in args.models:
        models["default"] = default_model_dir()
    cpu = cpu_line()
    print(cpu, flush=True)

    # GEMM shapes: every weight of every model at the full step's rows and at the dual step's rows.
    fits = {name: sizes.fit(read_model_config(d)[2].max_length) for name, d in models.items()}
    shapes, fp32 = set(), set()
    for name, d in models.items():
        _, arch, spec = read_model_config(d)
        for m in {fits[name].prompt + fits[name].gen, fits[name].block + int(spec.shift_logits), fits[name].block}:
            shapes |= {(m, n, k) for _, n, k, _ in linears(arch)}
            if name == "134m" or len(models) == 1:
                fp32 |= {(m, n, k) for label, n, k, _ in linears(arch) if label in ("gate", "down", "head")}
    rates = measure_rates(shapes, fp32, sizes.calls)
    print(f"\n{'dtype':9} {'M x N x K':>18} {'ms':>8} {'GFLOP/s':>8} {'weight GB/s':>11}")
    for g in rates.table():
        shape = f"{g['M']:>6}x{g['N']:>5}x{g['K']:>5}"
        print(f"{g['dtype']:9} {shape} {g['ms']:8.3f} {g['gflops']:8.1f} {g['weight_gbs']:11.1f}")
    print(f"bf16 peak {rates.peak_gflops:.0f} GFLOP/s; copy bandwidth {rates.bandwidth_gbs:.1f} GB/s (read + write)\n")

    print(HEADER, flush=True)
    rows = [r for name, d in models.items() for r in bench_model(name, d, args, fits[name], rates)]
    print("\nstep: the compiled step alone (engine.run_step); decode: engine.generate (llada decoder) / nfe;"
          "\noverhead: decode ms/step minus the compiled steps that decode called (dual: one full step per block)"
          "\nGEMM+SDPA: the step's weight GEMMs with cold weights + SDPA of every layer, each timed alone")
    for r in rows:
        f = r["floor"]
        print(f"  {r['artifact']}: {f['gflop']} GFLOP, {f['mbytes']} MB -> compute {f['compute_ms']} ms "
              f"(at peak {f['compute_at_peak_ms']}), memory {f['memory_ms']} ms; GEMMs cold {f['gemms_cold_ms']} ms, "
              f"SDPA {f['attention_ms']} ms ({f['attention_gflops']} GFLOP/s, no mask {f['attention_no_mask_ms']}); "
              f"nfe {r['nfe']}, "
              f"full step {r['full_step_ms']} ms, compile {r['compile_s']} s")
    if args.json:
        report = {"cpu": cpu, "gemm": rates.table(), "peak_gflops": rates.peak_gflops,
                  "bandwidth_gbs": rates.bandwidth_gbs, "rows": rows}
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
