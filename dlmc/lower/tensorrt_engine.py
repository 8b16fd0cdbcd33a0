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
from typing import Any

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


OPT_SEQ = 256
"""Canvas length the optimization profile is tuned for unless told: a prompt and its generation region,
not the longest the step accepts (TensorRT picks kernels for the opt shape; tuning for max length x
vocabulary gives kernels for logits no decode step produces)."""


def profile_shapes(manifest: dict, opt_batch: int = 1, opt_seq: int | None = None) -> dict[str, tuple[tuple, ...]]:
    """(min, opt, max) shape of every step input, from its named dims: batch, seq (the queries), cache
    and rows (a cached step's K/V columns and a fused step's rows, up to the longest canvas); ints stay."""
    sig = manifest["signature"]
    (b_min, b_max), (s_min, s_max) = sig["batch"], sig["seq"]
    query = (sig.get("cache") or {}).get("block_length")  # a cached step's queries: one block
    seq_opt = min(max(opt_seq or query or OPT_SEQ, s_min), s_max)
    ranges = {
        "batch": (b_min, min(max(opt_batch, b_min), b_max), b_max),
        "seq": (s_min, seq_opt, s_max),
        "cache": (1, min(max(opt_seq or OPT_SEQ, 1), s_max), s_max),
        "rows": (1, seq_opt, s_max),
    }
    shapes = {}
    for spec in sig["inputs"]:
        unknown = [d for d in spec["shape"] if isinstance(d, str) and d not in ranges]
        if unknown:
            raise DlmcError(f"build-engine: input {spec['name']} has a dim '{unknown[0]}' dlmc has no range for")
        shapes[spec["name"]] = tuple(
            tuple(ranges[d][i] if isinstance(d, str) else d for d in spec["shape"]) for i in range(3)
        )
    return shapes


def network_flags(trt: Any, exact: bool) -> int:
    """Network creation flags for this TensorRT. 8.x (JetPack 5) parses ONNX only into an explicit-batch
    network, which 10 makes the only kind (the flag is gone). An exact recipe's network is strongly
    typed: every layer runs in the dtype the graph gives it, never one TensorRT prefers."""
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if exact:
        if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            raise DlmcError(
                f"build-engine: this artifact is exact, and TensorRT {trt.__version__} cannot hold layers to "
                "the graph's dtypes (strongly typed networks need 9.0 or later); compile an approximate recipe"
            )
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def set_precision(trt: Any, config: Any, exact: bool, fp16: bool) -> None:
    """An exact engine computes in the graph's dtypes: no TF32 for fp32 matmuls and no fp16 for fp32
    layers (a strongly typed network refuses precision flags anyway). Otherwise fp16 when asked."""
    if exact:
        config.clear_flag(trt.BuilderFlag.TF32)
    elif fp16:
        config.set_flag(trt.BuilderFlag.FP16)


def build_engine(
    artifact: str | Path, out: str | Path | None = None, *, fp16: bool = True, workspace_gib: float = 4.0,
    opt_batch: int = 1, opt_seq: int | None = None,
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
    exact = bool(manifest.get("exact"))
    shapes = profile_shapes(manifest, opt_batch, opt_seq)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, exact))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves the external data (the artifact's safetensors byte ranges) by path
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DlmcError(f"{onnx_path}: TensorRT cannot parse the graph: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    set_precision(trt, config, exact, fp16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise DlmcError(f"{onnx_path}: graph input {name} is not in the manifest's signature")
        profile.set_shape(name, *shapes[name])
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
