"""The online Hadamard rotation x @ hadamard(n): a dense [n, n] product against the Kronecker-factored
form the quantize pass emits (dlmc.quant.hadamard.rotate), both compiled by AOTInductor.

    python benchmarks/hadamard.py [--threads 1] [--repeats 10]

Widths: the embedded model's hidden size and MLP intermediate (256, 768 = 3 x 256) and the hidden /
intermediate sizes of 7-8B dLLMs (4096; LLaDA-8B's 12288 = 3 x 4096). The median of `repeats` runs
after warm-up, with the largest difference from the dense product.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from dlmc.quant.hadamard import hadamard, kronecker_factors, rotate
from int8_matmul import aot_compiled, timed  # beside this script: the same warm-up, median and compilation

SHAPES = ((256, 5120), (768, 5120), (4096, 512), (12288, 256))  # (width n, rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| n | rows | factors | dense ms | factored ms | speed-up | max diff |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for n, rows in SHAPES:
            x = torch.randn(rows, n)
            r, (a, b) = hadamard(n), kronecker_factors(n)
            compiled = {
                False: aot_compiled(lambda x: torch.nn.functional.linear(x, r), x, Path(work) / f"{n}-dense.pt2"),
                True: aot_compiled(lambda x: rotate(x, a, b), x, Path(work) / f"{n}-factored.pt2"),
            }
            dense, fast = (timed(lambda m=compiled[f]: m(x), args.repeats) for f in (False, True))
            diff = (compiled[True](x) - compiled[False](x)).abs().max().item()
            layout = f"{n // (a.shape[0] * b.shape[0])} x ({a.shape[0]} x {b.shape[0]})"
            print(f"| {n} | {rows} | {layout} | {dense * 1e3:.2f} | {fast * 1e3:.2f} | {dense / fast:.1f}x | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
