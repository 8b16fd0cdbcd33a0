"""inductor: the step compiled ahead of time by AOTInductor (C++/OpenMP on CPU, Triton on CUDA).

Compiled once, at `dlmc compile` time, into an AOTInductor package (`step.pt2`: generated code and a
shared library). By default the package holds no weights: they stay in `weights.safetensors` and are
handed to the loaded package with `load_constants`, so the artifact keeps one portable copy of them.
With `freeze: true` Inductor folds the weights into the graph and prepacks them for the compiling
CPU's GEMM library (oneDNN's blocked bf16 layouts, `mkldnn._linear_pointwise`); the package then
carries them and there is no safetensors file. Batch and sequence length stay dynamic, with the
ranges recorded at capture.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file

from dlmc.capture import StepProgram
from dlmc.device import cuda_index
from dlmc.lower import LowerSettings
from dlmc.lower.eager import WEIGHTS_FILE, save_state
from dlmc.lower.materialize import materialize_tables
from dlmc.runtime.backends import attach_weights

PACKAGE_FILE = "step.pt2"


@dataclass(frozen=True, kw_only=True)
class InductorSettings(LowerSettings):
    """AOTInductor options."""

    backend: ClassVar[str] = "inductor"
    max_autotune: bool = False
    """Benchmark kernel variants while compiling (slower compile, sometimes faster step)."""
    exact_casts: bool = True
    """Round every intermediate of a fused kernel to the dtype eager PyTorch gives it, as eager does.
    Without it a bf16 step's logits move by ~0.06 from the captured step's; with it they are
    bit-identical on short inputs, and at a few hundred tokens differ only where Inductor picks another
    bf16 GEMM kernel (~0.03 at 272 tokens on this CPU)."""
    freeze: bool = False
    """Prepack the weights into the package (Inductor's freezing): the step's GEMMs skip repacking
    their weights on every call (on a 2-core AMD EPYC the 134M dual-cache step went from 30.9 to 22.0
    ms). Another GEMM kernel, so the logits match the captured step up to bf16 rounding, not bit for
    bit; the weights live inside the compiled library, which runs only on this kind of CPU."""


class InductorStep:
    def __init__(self, program: StepProgram, settings: InductorSettings, device: str):
        from torch._inductor import aoti_compile_and_package, aoti_load_package

        self.device = device
        self.settings = settings
        self._workdir = tempfile.TemporaryDirectory(prefix="dlmc-inductor-")
        work = Path(self._workdir.name)
        self.state = None if settings.freeze else save_state(program.exported, work / WEIGHTS_FILE)
        configs = {
            # Unfrozen, the weights are not baked into the shared library; they come from safetensors at load.
            "aot_inductor.package_constants_in_so": settings.freeze,
            "freezing": settings.freeze,
            "max_autotune": settings.max_autotune,
            "emulate_precision_casts": settings.exact_casts,
        }
        if torch.device(device).type == "cpu":  # RoPE's tables once per step, not once per layer and head
            program = materialize_tables(program)
        # Inductor freezes only a graph compiled without autograd.
        with torch.no_grad():
            aoti_compile_and_package(program.exported, package_path=str(work / PACKAGE_FILE), inductor_configs=configs)
        self._runner = aoti_load_package(str(work / PACKAGE_FILE), device_index=cuda_index(device))
        if not settings.freeze:
            attach_weights(self._runner, load_file(str(work / WEIGHTS_FILE), device=device))

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self._runner(*inputs)

    def save(self, directory: Path) -> dict[str, Any]:
        files = {"package": PACKAGE_FILE}
        if not self.settings.freeze:  # a frozen package carries its weights
            files["weights"] = WEIGHTS_FILE
        for name in files.values():
            shutil.copyfile(Path(self._workdir.name) / name, directory / name)
        entry = {"name": "inductor", "device": self.device, "files": files, "versions": {"torch": torch.__version__}}
        return entry if self.settings.freeze else {**entry, "state": self.state}


def lower(program: StepProgram, settings: InductorSettings, device: str) -> InductorStep:
    return InductorStep(program, settings, device)
