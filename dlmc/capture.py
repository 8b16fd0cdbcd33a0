"""Capture: one denoising step of a DiffusionLM, exported with torch.export.

The step always takes (input_ids, attention_mask, position_ids), whatever the family, so one signature
serves bidirectional, block-causal and causal models and batches with left padding. Batch and sequence
length are dynamic; the nodes keep `nn_module_stack`, so a pass can find "layer 3's attention".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal

import torch
from torch.export import Dim, ExportedProgram

from dlmc.artifact import StepSignature, TensorSpec
from dlmc.errors import DlmcError
from dlmc.models.moe import ExpertsForm, set_experts_form
from dlmc.models.transformer import DiffusionLM
from dlmc.spec import DenoiserSpec

DTypeName = Literal["float32", "bfloat16", "float16"]
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    dtype: DTypeName | None = None
    """Dtype the model is loaded and captured in; None keeps the checkpoint's dtype."""
    max_batch: int = 16
    """Largest batch the step accepts."""
    seq_buckets: tuple[int, ...] = ()
    """Empty: any sequence length in [2, max_length]. Otherwise the runtime pads every call up to the
    next bucket, so the backend only ever sees these lengths."""
    moe_experts: ExpertsForm | None = None
    """How an MoE model's experts are captured (dlmc.models.moe): "grouped" (one grouped matmul reading
    each expert's weights in place) or "tiled" (standard ops only); None: the backend's form, tiled for
    onnxrt and tensorrt, grouped otherwise. Numerically the same maths."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch: must be >= 1")
        if any(b < 2 for b in self.seq_buckets):
            raise ValueError("seq_buckets: every bucket must be >= 2")
        if list(self.seq_buckets) != sorted(set(self.seq_buckets)):
            raise ValueError("seq_buckets: must be strictly increasing")


@dataclass(frozen=True, kw_only=True)
class StepProgram:
    """One denoising step as a torch.export program, with the interface the runtime will drive."""

    exported: ExportedProgram
    signature: StepSignature
    spec: DenoiserSpec

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*inputs)

    @cached_property
    def module(self) -> torch.nn.Module:
        """The program as a runnable module (built once: unlifting the weights is not free)."""
        return self.exported.module()

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.exported.graph_module

    def with_exported(self, exported: ExportedProgram, signature: StepSignature | None = None) -> StepProgram:
        return replace(self, exported=exported, signature=signature or self.signature)


def capture(model: DiffusionLM, config: CaptureConfig) -> StepProgram:
    """Export one step of `model` (already in the dtype and on the device it will run with)."""
    spec = model.spec
    max_seq = config.seq_buckets[-1] if config.seq_buckets else spec.max_length
    if max_seq > spec.max_length:
        raise DlmcError(f"capture.seq_buckets: bucket {max_seq} exceeds the model's max_length {spec.max_length}")
    set_experts_form(model, config.moe_experts or "grouped")
    example = example_inputs(batch=min(2, config.max_batch), seq=min(8, max_seq), device=_device_of(model))
    # Example batch and length >= 2, or torch.export specialises the dims to 1 (its 0/1 rule).
    batch = Dim("batch", min=1, max=config.max_batch) if config.max_batch > 1 else None
    seq = Dim("seq", min=2, max=max_seq)
    dims = {name: {0: batch, 1: seq} if batch is not None else {1: seq} for name in STEP_INPUTS}
    try:
        with torch.no_grad():
            exported = torch.export.export(model, example, dynamic_shapes=dims)
    except Exception as e:  # torch.export raises many types; the user needs the op and the reason
        raise DlmcError(f"capture: cannot export the {spec.family} step: {describe_export_failure(e)}") from e
    signature = StepSignature(
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "seq")),
            TensorSpec("attention_mask", "bool", ("batch", "seq")),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
        ),
        outputs=(TensorSpec("logits", _dtype_name(_output_dtype(exported)), ("batch", "seq", spec.vocab_size)),),
        batch=(1, config.max_batch),
        seq=(2, max_seq),
        seq_buckets=config.seq_buckets,
    )
    return StepProgram(exported=exported, signature=signature, spec=spec)


def experts_form(config: CaptureConfig, lower: Any) -> ExpertsForm:
    """The MoE experts' form for a step lowered with `lower` (LowerSettings): the recipe's, else the backend's."""
    return config.moe_experts or lower.moe_experts


def example_inputs(*, batch: int, seq: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """A left-padded batch: row 0 has one pad token, so the mask and positions are not trivial."""
    input_ids = torch.arange(batch * seq, device=device).reshape(batch, seq) % 97  # [B, L] int64
    attention_mask = torch.ones(batch, seq, dtype=torch.bool, device=device)  # [B, L] bool
    if batch > 1:
        attention_mask[0, 0] = False
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L] int64
    return input_ids, attention_mask, position_ids


def describe_export_failure(e: Exception) -> str:
    """One line naming the operator (or user code) torch.export stumbled on."""
    text = str(e)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if len(reason) > 240:
        reason = reason[:237] + "..."
    where = _USER_FRAME.search(text)
    if where:  # data-dependent control flow and the like: point at the model code that did it
        reason += f" (at {where.group(1)}:{where.group(2)} in {where.group(3)})"
    op = _OP_NAME.search(text)
    if op and op.group(1) not in reason:
        return f"operator {op.group(1)}: {reason}"
    return reason


_USER_FRAME = re.compile(r"The following call raised this error:\s*File \"([^\"]+)\", line (\d+), in (\w+)")
# An operator as torch's messages spell it: "ns::name", "aten.name.overload", "torch.ops.ns.name".
_OP_NAME = re.compile(r"\b([a-z_][a-z0-9_]*::[A-Za-z_]\w*(?:\.\w+)?|aten\.[A-Za-z_]\w*\.\w+|torch\.ops\.[\w.]+)")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _output_dtype(exported: ExportedProgram) -> torch.dtype:
    out = exported.graph.output_node().args[0][0]
    return out.meta["val"].dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
