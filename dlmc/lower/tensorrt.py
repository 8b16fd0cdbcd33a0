"""tensorrt: the step compiled by Torch-TensorRT into TensorRT engines (CUDA only).

`torch_tensorrt.dynamo.compile` takes the captured ExportedProgram and one optimization profile
(min/opt/max shapes from the step signature); `torch_tensorrt.save` writes the result as an
ExportedProgram archive (`step.ep`) whose TensorRT engines are serialized torchbind objects.
torch_tensorrt is imported only inside this backend, and only when it is chosen: install it with the
`trt` extra on a CUDA machine. Engines are built for the GPU they were compiled on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from dlmc.capture import STEP_INPUTS, StepProgram, example_inputs
from dlmc.errors import DlmcError
from dlmc.lower import LowerSettings
from dlmc.lower.tensorrt_engine import OPT_SEQ

PROGRAM_FILE = "step.ep"


@dataclass(frozen=True, kw_only=True)
class TensorRtSettings(LowerSettings):
    """Torch-TensorRT build options."""

    backend: ClassVar[str] = "tensorrt"
    moe_experts: ClassVar[str] = "tiled"  # TensorRT converts standard ops only, not torch.ops.dlmc.grouped_mm
    packages: ClassVar[tuple[str, ...]] = ("torch_tensorrt",)
    extra: ClassVar[str | None] = "trt"
    needs_cuda: ClassVar[bool] = True
    opt_batch: int = 1
    """Batch size the optimization profile is tuned for."""
    opt_seq: int | None = None
    """Sequence length it is tuned for; None = 256 (a prompt and its generation region), within the
    step's range. Not the longest: TensorRT picks kernels for this shape."""
    optimization_level: int = 3
    """TensorRT builder optimization level, 0 (fast build) to 5 (slow build, best kernels)."""
    min_block_size: int = 5
    """Fewest consecutive convertible ops worth a TensorRT engine; shorter runs stay in PyTorch."""
    require_full_compilation: bool = False
    """Fail instead of leaving unconvertible ops to PyTorch."""
    workspace_size: int = 0
    """Builder workspace in bytes; 0 lets TensorRT choose."""

    def __post_init__(self) -> None:
        if self.opt_batch < 1:
            raise ValueError("opt_batch: must be >= 1")
        if self.opt_seq is not None and self.opt_seq < 2:
            raise ValueError("opt_seq: must be >= 2")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError("optimization_level: must be between 0 and 5")
        if self.min_block_size < 1:
            raise ValueError("min_block_size: must be >= 1")
        if self.workspace_size < 0:
            raise ValueError("workspace_size: must be >= 0")


class TensorRtStep:
    def __init__(self, program: StepProgram, settings: TensorRtSettings, device: str):
        import torch_tensorrt

        self.device = device
        self.settings = settings
        sig = program.signature
        if sig.cache is not None:
            raise DlmcError(
                "lower.backend: tensorrt cannot build a step with K/V cache inputs yet; use inductor or onnxrt"
            )
        low_seq = sig.seq_buckets[0] if sig.seq_buckets else sig.seq[0]
        opt_seq = min(max(settings.opt_seq or OPT_SEQ, low_seq), sig.seq[1])
        opt_batch = min(settings.opt_batch, sig.batch[1])
        dtypes = {"input_ids": torch.int64, "attention_mask": torch.bool, "position_ids": torch.int64}
        profile = [
            torch_tensorrt.Input(
                min_shape=(sig.batch[0], low_seq),
                opt_shape=(opt_batch, opt_seq),
                max_shape=(sig.batch[1], sig.seq[1]),
                dtype=dtypes[name],
                name=name,
            )
            for name in STEP_INPUTS
        ]
        self.module = torch_tensorrt.dynamo.compile(
            program.exported,
            arg_inputs=profile,
            device=torch.device(device),
            min_block_size=settings.min_block_size,
            optimization_level=settings.optimization_level,
            require_full_compilation=settings.require_full_compilation,
            workspace_size=settings.workspace_size,
            # Explicit precision: every layer in the dtype the captured graph gives it (no fp16 for fp32
            # layers) and no TF32 for fp32 matmuls, so the engine computes what the reference computes.
            use_explicit_typing=True,
            disable_tf32=True,
        )
        # What torch_tensorrt.save needs to re-export with the same dynamic dims.
        batch = torch.export.Dim("batch", min=sig.batch[0], max=sig.batch[1]) if sig.batch[1] > 1 else None
        seq = torch.export.Dim("seq", min=low_seq, max=sig.seq[1])
        # Positional (a tuple), so it does not depend on the compiled module's argument names.
        self._dims = tuple({0: batch, 1: seq} if batch is not None else {1: seq} for _ in STEP_INPUTS)
        self._example = example_inputs(batch=min(2, sig.batch[1]), seq=max(low_seq, min(8, sig.seq[1])), device=device)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.module(*inputs)

    def save(self, directory: Path) -> dict[str, Any]:
        import torch_tensorrt

        torch_tensorrt.save(
            self.module,
            str(directory / PROGRAM_FILE),
            output_format="exported_program",
            arg_inputs=list(self._example),
            dynamic_shapes=self._dims,
            retrace=True,
        )
        return {
            "name": "tensorrt",
            "device": self.device,
            "files": {"program": PROGRAM_FILE},
            "gpu": torch.cuda.get_device_name(torch.device(self.device)),
            "versions": {"torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__},
        }


def lower(program: StepProgram, settings: TensorRtSettings, device: str) -> TensorRtStep:
    return TensorRtStep(program, settings, device)
