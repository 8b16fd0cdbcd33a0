"""`torch.ops.dlmc_cpu.attention`: bf16 attention on CPUs with AVX512-BF16, its products on the bf16
dot-product unit (`cpu_attention.cpp`, compiled here at first use).

    attention(query [B, H, Lq, D], key [B, Hk, Lk, D], value [B, Hk, Lk, D], mask bool [.., Lq, Lk] | None,
              scale) -> [B, H, Lq, D]     (bfloat16; H a multiple of Hk; mask True = may attend)

The same maths as `F.scaled_dot_product_attention` in bf16 on the CPU (ATen's flash kernel): fp32 scores
and softmax, the probabilities rounded to bf16 for the P.V product, fp32 sums; only the order of the fp32
sums differs. ATen's kernel runs its products outside oneDNN's bf16 GEMM on CPUs without AMX, several
times slower than this one (benchmarks/attention_cpu.py). The op's schema and fake implementation are
registered on import, so a graph calling it can be exported, deserialized and inspected anywhere; its
CPU kernel is compiled (torch.utils.cpp_extension with g++ and ninja, ~10 s once per machine, cached under
$TORCH_EXTENSIONS_DIR) and loaded by `load()`, only on a CPU with the instructions it needs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from dlmc.errors import DlmcError

NAME = "cpu_attention"
"""What a step's signature records (`StepSignature.kernels`) when it calls this kernel."""
SOURCE = Path(__file__).with_name("cpu_attention.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
"""/proc/cpuinfo flags the kernel's instructions need."""

_LIB = torch.library.Library("dlmc_cpu", "DEF")
_LIB.define("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor")


@torch.library.register_fake("dlmc_cpu::attention")
def _attention_fake(query, key, value, mask, scale):
    return query.new_empty(query.shape).contiguous()


attention = torch.ops.dlmc_cpu.attention.default


def missing_cpu_flags() -> list[str]:
    """The instruction sets this CPU lacks for the kernel (empty: it can run here)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return list(CPU_FLAGS)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f not in flags]


@functools.cache
def load() -> None:
    """Compile (once per machine) and load the CPU kernel; one line if this CPU cannot run it."""
    missing = missing_cpu_flags()
    if missing:
        raise DlmcError(f"dlmc_cpu.attention: this CPU lacks {', '.join(missing)} (the kernel's instructions)")
    from torch.utils.cpp_extension import load as build

    # -fopenmp: at::parallel_for is inline OpenMP; without it the kernel would run on one thread
    flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
    try:
        build(name="dlmc_cpu_attention", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
              is_python_module=False)
    except Exception as e:  # a compiler missing or failing: the one line, not its log
        raise DlmcError(f"dlmc_cpu.attention: cannot compile {SOURCE.name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
