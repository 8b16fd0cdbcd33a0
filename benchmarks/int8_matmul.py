"""Is an int8 matmul faster than fp32 / bf16 on this CPU? One linear layer, timed in one process.

    python benchmarks/int8_matmul.py [--m 512 --k 768 --n 2048] [--threads 1] [--repeats 20]

Variants (y = x @ W^T, x [M, K], W [N, K]):
  fp32 / bf16 F.linear           the float baselines
  _int_mm                        int8 x int8 -> int32 (torch.ops.aten._int_mm), the W8A8 kernel
  _weight_int8pack_mm            fp32/bf16 x int8 weight with per-channel scales (weight-only int8)
  dlmc linear_woq / linear_w8a8  the operators a quantized step calls, eager and compiled by
                                 AOTInductor (export + aoti_compile_and_package), as an `inductor`
                                 artifact's step is
The median of `repeats` runs after warm-up is reported, as GFLOP/s and as a ratio to fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dlmc.quant import ops
from dlmc.quant.formats import rtn


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Wrapped(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def aot_compiled(fn, x: torch.Tensor, path: Path):
    """fn exported and compiled by AOTInductor, the way an `inductor` artifact's step is (torch.compile
    can take other decisions: here it once turned the int8 product into an fp32 mm)."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    exported = torch.export.export(Wrapped(fn), (x,))
    return aoti_load_package(aoti_compile_and_package(exported, package_path=str(path)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, k, n = args.m, args.k, args.n
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.02
    qw = rtn(w, 8, True, k)
    q8 = qw.codes.to(torch.int8)  # [N, K]
    scale = qw.scale.reshape(-1)  # [N]
    xq = torch.randint(-127, 127, (m, k), dtype=torch.int8)
    q4 = rtn(w, 4, True, 64)
    from dlmc.quant.layer import QuantizedLayer, buffers
    from dlmc.quant.scheme import Scheme

    b4 = buffers(QuantizedLayer(scheme=Scheme(weights="int4"), weight=q4), torch.float32)
    b8 = buffers(QuantizedLayer(scheme=Scheme(), weight=qw), torch.float32)
    xb, wb = x.bfloat16(), w.bfloat16()

    woq8 = lambda x: ops.linear_woq(x, b8["qweight"], b8["scale"], None, None, 8)  # noqa: E731
    woq4 = lambda x: ops.linear_woq(x, b4["qweight"], b4["scale"], None, None, 4)  # noqa: E731
    w8a8 = lambda x: ops.linear_w8a8(x, q8, b8["scale"], None, None)  # noqa: E731
    variants = {
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(xb, wb),
        "int8 _int_mm (int32 out)": lambda: torch._int_mm(xq, q8.t()),
        "fp32 x int8 _weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, scale),
        "bf16 x int8 _weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, scale.bfloat16()),
        "dlmc linear_woq int8, eager": lambda: woq8(x),
        "dlmc linear_woq int4, eager": lambda: woq4(x),
        "dlmc linear_w8a8 per-token, eager": lambda: w8a8(x),
    }
    compiled = {"dlmc linear_woq int8, AOTInductor": woq8, "dlmc linear_woq int4, AOTInductor": woq4,
                "dlmc linear_w8a8 per-token, AOTInductor": w8a8, "fp32 F.linear, AOTInductor": lambda x: F.linear(x, w)}
    with tempfile.TemporaryDirectory() as work:
        for name, fn in compiled.items():
            variants[name] = lambda fn=aot_compiled(fn, x, Path(work) / f"{len(variants)}.pt2"): fn(x)
    flops = 2 * m * k * n
    results = {}
    for name, fn in variants.items():
        try:
            results[name] = timed(fn, args.repeats)
        except Exception as e:  # an op this build lacks: say so, keep going
            print(f"{name:40} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    base = results["fp32 F.linear"]
    print(f"M={m} K={k} N={n}, {args.threads} thread(s), median of {args.repeats}")
    print(f"| variant | ms | GFLOP/s | speed vs fp32 |\n|---|---|---|---|")
    for name, t in results.items():
        print(f"| {name} | {t * 1e3:.2f} | {flops / t / 1e9:.1f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
