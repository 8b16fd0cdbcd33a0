"""onnxrt: the step exported to a standard ONNX model (torch.onnx, dynamo exporter) run by onnxruntime.

`model.onnx` passes `onnx.checker`. Its weights use ONNX's standard external-data mechanism, pointed
at byte ranges inside `weights.safetensors` (a safetensors file is a JSON header followed by raw
little-endian tensor bytes, which is exactly what ONNX external data references), so the artifact
keeps one copy of the weights, readable by both ecosystems. Small shape constants stay inline.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from dlmc.capture import STEP_INPUTS, StepProgram
from dlmc.lower import LowerSettings
from dlmc.runtime.backends import ORT_PROVIDERS, open_session, session_step

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
INLINE_BYTES = 1024
"""Initializers smaller than this stay inside model.onnx (ONNX shape inference needs to read them)."""
Optimization = Literal["disable", "basic", "extended", "all"]


@dataclass(frozen=True, kw_only=True)
class OnnxRtSettings(LowerSettings):
    """ONNX export and onnxruntime session options."""

    backend: ClassVar[str] = "onnxrt"
    packages: ClassVar[tuple[str, ...]] = ("onnx", "onnxscript", "onnxruntime")
    extra: ClassVar[str | None] = "onnx"
    moe_experts: ClassVar[str] = "tiled"  # ONNX has no grouped GEMM; the tiles are standard ops
    opset: int = 20
    """ONNX opset of the exported model (the dynamo exporter needs 18 or later)."""
    providers: tuple[str, ...] = ()
    """onnxruntime execution providers, in priority order; empty = the device's provider
    (CPUExecutionProvider on cpu, CUDAExecutionProvider on cuda)."""
    optimization: Optimization = "all"
    """onnxruntime graph optimization level, applied when the session is created."""
    int4: Literal["qdq", "matmulnbits"] = "qdq"
    """How int4 weights appear in the graph: `qdq`, a blocked int4 DequantizeLinear + MatMul (opset
    21; TensorRT parses it, ONNX Runtime fuses it into MatMulNBits), or `matmulnbits`, ONNX Runtime's
    own operator (ONNX Runtime only)."""

    def __post_init__(self) -> None:
        if self.opset < 18:
            raise ValueError("opset: the dynamo ONNX exporter needs opset 18 or later")

    def unsupported(self, device: str, dtypes: frozenset[str]) -> list[str]:
        problems = []
        providers = self.providers or ORT_PROVIDERS.get(torch.device(device).type, ())
        import onnxruntime

        available = onnxruntime.get_available_providers()
        for name in providers:
            if name not in available:
                problems.append(
                    f"lower.providers: {name} is not available in this onnxruntime (has {', '.join(available)})"
                )
        if "bfloat16" in dtypes and providers and providers[0] == "CPUExecutionProvider":
            problems.append(
                "lower.backend: onnxruntime's CPUExecutionProvider has no bfloat16 MatMul; "
                "use float16 or float32 here, or a CUDA provider"
            )
        return problems


class OnnxRtStep:
    def __init__(self, program: StepProgram, settings: OnnxRtSettings, device: str):
        import onnx

        from dlmc.quant.onnx import int4_qdq, translation_table

        self.device = device
        self.settings = settings
        self._workdir = tempfile.TemporaryDirectory(prefix="dlmc-onnx-")
        work = Path(self._workdir.name)
        exported = program.exported
        if torch.device(device).type != "cpu":
            # The ONNX graph is device-free; export from a CPU copy so the weights land on the host.
            exported = torch.export.passes.move_to_device_pass(exported, "cpu")
        onnx_program = torch.onnx.export(
            exported,
            (),
            dynamo=True,
            opset_version=settings.opset,
            input_names=[t.name for t in program.signature.inputs],
            output_names=[t.name for t in program.signature.outputs],
            verbose=False,
            custom_translation_table=translation_table(),  # the dlmc quantized operators
        )
        model = onnx_program.model_proto
        if settings.int4 == "qdq":
            int4_qdq(model)
        _name_dynamic_dims(model, exported)
        externalise_to_safetensors(model, work / WEIGHTS_FILE)
        onnx.save(model, str(work / MODEL_FILE))
        onnx.checker.check_model(str(work / MODEL_FILE), full_check=True)
        # The same session code the runtime uses, so the compile-time check runs what users run.
        self._step = session_step(
            open_session(work / MODEL_FILE, settings.providers, settings.optimization, device), device
        )

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self._step(*inputs)

    def save(self, directory: Path) -> dict[str, Any]:
        import onnx
        import onnxruntime

        for name in (MODEL_FILE, WEIGHTS_FILE):
            shutil.copyfile(Path(self._workdir.name) / name, directory / name)
        return {
            "name": "onnxrt",
            "device": self.device,
            "files": {"model": MODEL_FILE, "weights": WEIGHTS_FILE},
            "providers": list(self.settings.providers),
            "optimization": self.settings.optimization,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        }


def lower(program: StepProgram, settings: OnnxRtSettings, device: str) -> OnnxRtStep:
    return OnnxRtStep(program, settings, device)


def externalise_to_safetensors(model: Any, path: Path) -> None:
    """Move every large initializer of `model` into a safetensors file at `path` and point the
    initializer at its byte range there (ONNX external data: location, offset, length)."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import save_file

    large = [init for init in model.graph.initializer if _nbytes(init) >= INLINE_BYTES]
    tensors = {init.name: _stored(init, numpy_helper) for init in large}
    save_file(tensors, str(path))
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    for init in large:
        begin, end = header[init.name]["data_offsets"]
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            init.ClearField(field)
        del init.external_data[:]
        for key, value in (("location", path.name), ("offset", str(data_start + begin)), ("length", str(end - begin))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        init.data_location = onnx.TensorProto.EXTERNAL


def _nbytes(init: Any) -> int:
    from onnx import TensorProto, helper

    count = 1
    for d in init.dims:
        count *= d
    if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def _stored(init: Any, numpy_helper: Any) -> torch.Tensor:
    """The initializer's bytes as a torch tensor; 4-bit types stay packed, two per byte, as ONNX
    external data holds them (numpy_helper would unpack them to one per byte)."""
    from onnx import TensorProto

    if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return torch.frombuffer(bytearray(init.raw_data), dtype=torch.uint8)
    return _to_torch(numpy_helper.to_array(init), init.data_type)


def _to_torch(array: Any, onnx_type: int) -> torch.Tensor:
    import numpy as np
    from onnx import TensorProto

    if onnx_type == TensorProto.BFLOAT16:  # numpy has no bfloat16: move the raw bits
        bits = np.ascontiguousarray(array).view(np.uint16)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def _name_dynamic_dims(model: Any, exported: torch.export.ExportedProgram) -> None:
    """Give the symbolic dims of the graph's inputs and outputs their capture names (batch, seq, cache)."""
    names = {}
    for node in exported.graph.find_nodes(op="placeholder"):
        if node.name in STEP_INPUTS or node.name in ("cache_mask", "cache_positions"):
            dims = ("batch", "seq") if node.name in STEP_INPUTS else ("batch", "cache")
            for dim, name in zip(node.meta["val"].shape, dims, strict=False):
                if isinstance(dim, torch.SymInt):
                    names[str(dim)] = name
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
