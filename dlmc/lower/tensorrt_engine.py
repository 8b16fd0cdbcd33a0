"""build-engine: a TensorRT engine built from the ONNX graph an `onnxrt` artifact carries, on the
device that will run it (TensorRT engines are specific to the GPU and TensorRT version; on Jetson they
must be built on the board). The QDQ (QuantizeLinear/DequantizeLinear) nodes of a W8A8 / W8A16 graph
are TensorRT's explicit-quantization input, so int8 layers run as int8 kernels.

TensorRT (the `tensorrt` Python package: JetPack on Jetson, pip/NVIDIA index elsewhere) is imported
only here. Without it, or without a CUDA device, the command fails with one line. The engine is
written atomically beside the artifact (default `<artifact>.engine`: inside it, the manifest's file
list would no longer match); the dlmc runtime does not load engines yet: run it with TensorRT's
runtime (e.g. `trtexec --loadEngine`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dlmc.errors import DlmcError

TRT_UNSUPPORTED_OPS = {
    "MatMulNBits": "int4 weights were lowered to ONNX Runtime's MatMulNBits, which TensorRT cannot parse"
}


def onnx_graph_of(artifact: Path) -> tuple[Path, dict]:
    """The artifact's ONNX model file and its manifest; one line when there is none."""
    from dlmc.artifact import read_manifest

    manifest = read_manifest(artifact)
    backend = manifest.get("backend", {})
    if backend.get("name") != "onnxrt":
        raise DlmcError(
            f"{artifact}: build-engine needs an artifact compiled with lower.backend: onnxrt "
            f"(this one is {backend.get('name')}), which carries the ONNX graph"
        )
    path = artifact / backend["files"]["model"]
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type in TRT_UNSUPPORTED_OPS:
            reason = TRT_UNSUPPORTED_OPS[node.op_type]
            raise DlmcError(f"{path}: {reason} (node {node.name}); compile with lower.int4: qdq")
    return path, manifest


def build_engine(
    artifact: str | Path, out: str | Path | None = None, *, fp16: bool = True, workspace_gib: float = 4.0,
    opt_batch: int = 1,
) -> Path:
    artifact = Path(artifact)
    out = Path(out) if out is not None else artifact.parent / f"{artifact.name}.engine"
    onnx_path, manifest = onnx_graph_of(artifact)
    try:
        import tensorrt as trt
    except ImportError:
        raise DlmcError(
            "build-engine: TensorRT is not installed (on Jetson it comes with JetPack; elsewhere "
            "pip install tensorrt from NVIDIA's index)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise DlmcError("build-engine: no CUDA device; a TensorRT engine is built on the GPU that will run it")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves the external data (the artifact's safetensors byte ranges) by path
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DlmcError(f"{onnx_path}: TensorRT cannot parse the graph: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    sig = manifest["signature"]
    (b_min, b_max), (s_min, s_max) = sig["batch"], sig["seq"]
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, (b_min, s_min), (min(opt_batch, b_max), s_max), (b_max, s_max))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise DlmcError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(engine)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
