"""Where the kernels run: an explicit choice per device, and kernels jitted at their first launch."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from dlmc.errors import DlmcError


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


CPU_INTERPRETER = "DLMC_TRITON_CPU"
"""Set to 1 (with TRITON_INTERPRET=1) to run the kernels on CPU tensors in Triton's interpreter: how the
CPU tests drive a step rewritten by the triton_kernels pass through the kernels themselves."""


def use_triton(device: str | torch.device) -> bool:
    """True on CUDA (the Triton kernel runs), False elsewhere (the plain-torch reference runs) unless
    DLMC_TRITON_CPU=1 asks for Triton's interpreter. On CUDA without triton it is an error, never a silent
    fall back to the slower reference."""
    if torch.device(device).type != "cuda":
        if os.environ.get(CPU_INTERPRETER) != "1":
            return False
        if not triton_available() or not interpreting():
            raise DlmcError(f"kernels: {CPU_INTERPRETER}=1 runs Triton's interpreter on CPU; it needs triton "
                            "installed and TRITON_INTERPRET=1 set before the first kernel runs")
        return True
    if not triton_available():
        raise DlmcError("kernels: triton is not installed on this CUDA machine (pip install 'dlmc[kernels]')")
    return True


class LazyKernel:
    """A Triton kernel jitted at its first launch rather than at import. `triton.jit` decides at that
    moment between the compiler and the interpreter (TRITON_INTERPRET), so importing dlmc.kernels early
    (or on a machine without triton) fixes nothing."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._jitted = None

    def __getitem__(self, grid):
        if self._jitted is None:
            import triton

            self._jitted = triton.jit(self.fn)
        return self._jitted[grid]


def dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """(tl.dot's input precision, widen the operands to float32 first) for operands of `dtype`.

    float32 operands stay IEEE float32: tl.dot's default would round them to tf32 (ten mantissa bits),
    far beyond the reference's rounding. 16-bit operands multiply exactly into the float32 accumulator.
    Triton's interpreter (3.7) multiplies bfloat16 tiles wrongly (numpy has no bfloat16), so there they
    are widened to float32 first: the same products (exact either way), only slower."""
    if dtype == torch.float32:
        return "ieee", False
    if dtype == torch.bfloat16 and interpreting():
        return "ieee", True
    return "tf32", False  # ignored by tl.dot for 16-bit operands


def interpreting() -> bool:
    """Whether triton.jit builds interpreted kernels (TRITON_INTERPRET), read as Triton reads it."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
