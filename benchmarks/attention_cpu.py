"""Exact bf16 attention on the CPU: ATen's SDPA against formulations that keep the scores in fp32.

    python benchmarks/attention_cpu.py [--threads 2] [--calls 15] [--batches 1 4] [--backends eager compile aoti dlmc]

At the 134M checkpoint's attention (benchmarks/compile_ratio.py: 12 heads of 64) and the shapes its steps run
(512 queries x 512 keys: the full step; 32 x 512: the dual-cache step), for each mask the model builds (key
padding: the [B, 1, Lq, Lk] bool mask `attention_mask_for` gives; none: bidirectional without padding;
causal), every candidate is timed interleaved with the others in this one process (median of --calls), and
its output compared with SDPA's and with a float64 reference. The machine is shared: only ratios measured
in the same run mean anything. Candidates:

- sdpa: `F.scaled_dot_product_attention(q, k, v, attn_mask=mask)` in bf16, what the model calls. On the
  CPU it runs ATen's flash kernel, whose bf16 QK^T and PV products do not go through oneDNN (no oneDNN
  primitive runs; checked with ONEDNN_VERBOSE=1): 30-160 GFLOP/s against ~900 for a bf16 GEMM.
- sdpa_nomask: the same without a mask (only where the mask allows every key).
- split: QK^T as a bf16 GEMM, then its rounding residual as a second bf16 GEMM (`baddbmm(hi, q, k^T,
  beta=-1)`: oneDNN accumulates q k^T - hi in fp32 and rounds that), so hi + lo is q k^T to ~2^-18
  relative, fp32-grade; scale, mask and softmax in fp32; P rounded to bf16 (as the flash kernel does) @ V.
- fp32_math: QK^T and softmax in fp32 (upcast inputs, an fp32 GEMM), P in bf16 @ V.
- bf16_math: QK^T rounded to bf16, softmax in fp32: NOT exact (the scores lose ~2^-9 relative; shown for
  scale only, the formulation the issue measured as 1.7x faster).
- flex: `flex_attention` compiled by Inductor (its CPU template), bidirectional only.
- dlmc_cpu.attention (`--backends dlmc`): dlmc's AVX512-BF16 kernel (dlmc/kernels/cpu_attention.cpp), fp32
  scores and softmax, P rounded to bf16, both products on the bf16 dot-product unit.
The compile backend is torch.compile (Inductor, static shapes) of each function; aoti is AOTInductor of
sdpa and split with the settings of recipes/cpu-bf16.yaml (freezing, exact casts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dlmc.kernels import cpu_attention

HEADS, HEAD_DIM = 12, 64  # the 134M config of benchmarks/compile_ratio.py
SHAPES = {"full": (512, 512), "cached": (32, 512)}  # name -> (queries, keys)
MASKS = ("padding", "none", "causal")


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_nomask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v)


def split(q, k, v, mask):
    # q: [B, H, Lq, D], k, v: [B, H, Lk, D] bf16; mask: [B, 1, Lq, Lk] bool or None -> [B, H, Lq, D] bf16
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q3 = q.reshape(B * H, Lq, D)
    kT = k.reshape(B * H, Lk, D).transpose(1, 2)  # [BH, D, Lk]
    hi = torch.bmm(q3, kT)  # [BH, Lq, Lk] bf16: q k^T rounded once
    lo = torch.baddbmm(hi, q3, kT, beta=-1)  # the rounding residual, accumulated in fp32 before its own rounding
    scores = (hi.float() + lo.float()).view(B, H, Lq, Lk) * D**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)


def fp32_math(q, k, v, mask):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)


def bf16_math(q, k, v, mask):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # rounded to bf16 first
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)


def flex(q, k, v, mask):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v)


EAGER = {"sdpa": sdpa, "sdpa_nomask": sdpa_nomask, "split": split, "fp32_math": fp32_math, "bf16_math": bf16_math}
COMPILED = {"sdpa": sdpa, "split": split, "flex": flex}
AOTI = {"sdpa": sdpa, "split": split}


def make_inputs(batch: int, queries: int, keys: int, mask: str):
    torch.manual_seed(0)
    q = (torch.randn(batch, HEADS, queries, HEAD_DIM) * 1.5).to(torch.bfloat16)  # [B, H, Lq, D]
    k = (torch.randn(batch, HEADS, keys, HEAD_DIM) * 1.5).to(torch.bfloat16)  # [B, H, Lk, D]
    v = torch.randn(batch, HEADS, keys, HEAD_DIM).to(torch.bfloat16)
    if mask == "none":
        return q, k, v, None
    if mask == "causal":  # the queries are the last `queries` rows of the canvas
        rows = torch.arange(keys - queries, keys)
        allowed = (torch.arange(keys)[None, :] <= rows[:, None])[None, None]  # [1, 1, Lq, Lk]
        return q, k, v, allowed.expand(batch, 1, queries, keys)
    allowed = torch.ones(batch, 1, queries, keys, dtype=torch.bool)  # [B, 1, Lq, Lk]
    allowed[0, ..., : keys // 8] = False  # row 0 is left-padded; its queries all see real keys
    return q, k, v, allowed


def aoti_runner(fn, example) -> Callable:
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    class Wrap(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return fn(q, k, v, mask)

    configs = {"freezing": True, "aot_inductor.package_constants_in_so": True, "emulate_precision_casts": True}
    with torch.no_grad(), tempfile.TemporaryDirectory() as work:
        exported = torch.export.export(Wrap(), example)
        path = aoti_compile_and_package(exported, package_path=str(Path(work) / "a.pt2"), inductor_configs=configs)
        return aoti_load_package(path)


def dlmc_kernel(q, k, v, mask):
    """dlmc's CPU kernel (`dlmc_cpu.attention`, what the cpu_attention pass puts in a bf16 step)."""
    return cpu_attention.attention(q, k, v, mask, q.shape[-1] ** -0.5)


def candidates(backends: list[str], example, mask: str) -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    if "dlmc" in backends:
        cpu_attention.load()  # one line if this CPU lacks AVX512-BF16
        out["dlmc_cpu.attention"] = dlmc_kernel
    if "eager" in backends:
        out |= {n: f for n, f in EAGER.items() if n != "sdpa_nomask" or mask == "none"}
    if "compile" in backends:
        out |= {f"compile:{n}": torch.compile(f, fullgraph=True, dynamic=False) for n, f in COMPILED.items()
                if n != "flex" or mask == "none"}
    if "aoti" in backends and example[3] is not None:  # export needs a mask tensor for the 4-input signature
        out |= {f"aoti:{n}": aoti_runner(f, example) for n, f in AOTI.items()}
    return out


def interleaved_ms(fns: dict[str, Callable], args, calls: int) -> dict[str, float]:
    with torch.no_grad():
        for fn in fns.values():
            fn(*args)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(calls):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(*args)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    has = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"flags {' '.join(has)}, load avg {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    parser.add_argument("--backends", nargs="+", default=["eager", "compile"], choices=["eager", "compile", "aoti", "dlmc"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_line())
    print("| shape | B | mask | candidate | ms | GFLOP/s | x sdpa | max err vs sdpa | vs fp64 (sdpa's) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        queries, keys = SHAPES[shape]
        for batch in args.batches:
            for mask in args.masks:
                example = make_inputs(batch, queries, keys, mask)
                fns = candidates(args.backends, example, mask)
                ms = interleaved_ms(fns, example, args.calls)
                with torch.no_grad():
                    exact = sdpa(*(t.double() if t.is_floating_point() else t for t in example[:3]), example[3])
                    ref = sdpa(*example)
                    ref_err = float((ref.double() - exact).abs().max())
                    flops = 4 * batch * HEADS * queries * keys * HEAD_DIM
                    for name, fn in fns.items():
                        out = fn(*example)
                        err = float((out.double() - ref.double()).abs().max())
                        err64 = float((out.double() - exact).abs().max())
                        print(f"| {shape} {queries}x{keys} | {batch} | {mask} | {name} | {ms[name]:.3f} | "
                              f"{flops / ms[name] / 1e6:.0f} | {ms.get('sdpa', ms[name]) / ms[name]:.2f} | {err:.2e} | "
                              f"{err64:.2e} ({ref_err:.2e}) |", flush=True)


if __name__ == "__main__":
    main()
