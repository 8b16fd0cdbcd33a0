"""Loading a compiled step from an artifact, one small loader per backend.

Each loader imports its backend package only when called, so a process that runs an ONNX artifact
never imports torch._inductor or torch_tensorrt, and a missing package is one clear line. Nothing here
unpickles a file from the artifact (see ARTIFACT.md, "Loading safely").
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dlmc.device import check_device, cuda_index
from dlmc.errors import DlmcError
from dlmc.runtime.weights import WeightFiles

Step = Callable[..., Any]
"""The step's inputs in signature order -> its outputs: logits [B, L, V], or a tuple when the step has
more outputs (a cached step also returns the fresh keys and values)."""

PACKAGES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "eager": ((), None),
    "inductor": ((), None),
    "onnxrt": (("onnxruntime",), "onnx"),
    "tensorrt": (("torch_tensorrt",), "trt"),
}
"""Backend -> (modules it imports, the dlmc extra that installs them)."""
FILES = {"eager": ("graph", "weights"), "inductor": ("package",), "onnxrt": ("model",), "tensorrt": ("program",)}
"""Backend -> the files its manifest entry must name (backend.files); an inductor package names its
weights file unless it was frozen with them."""
STATE = ("parameters", "buffers", "constants")
"""What backend.state lists for a backend that reads its weights by name from a safetensors file."""
NAMED_WEIGHTS = ("eager", "inductor")
"""Those backends (onnxrt's model points at byte ranges of its weights file instead)."""


def load_kernels(names: tuple[str, ...]) -> None:
    """Load (compiling once per machine) the native kernels a step's signature names; one line if a kernel
    is unknown or cannot run on this CPU."""
    from dlmc.kernels import cpu_attention

    loaders = {cpu_attention.NAME: cpu_attention.load}
    for name in names:
        if name not in loaders:
            raise DlmcError(f"signature.kernels: unknown kernel '{name}' (this dlmc has {', '.join(loaders)})")
        loaders[name]()


def load_step(root: Path, entry: dict[str, Any], device: str, weights: WeightFiles | None = None) -> Step:
    """The step of one backend entry. Steps loaded with the same `weights` share the tensors of a weights
    file they both name (a multi-program artifact's programs)."""
    name = entry.get("name")
    if name not in LOADERS:
        raise DlmcError(f"{root / 'manifest.json'}: unknown backend '{name}' (this dlmc knows {', '.join(LOADERS)})")
    modules, extra = PACKAGES[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        hint = f"; pip install 'dlmc[{extra}]'" if extra else ""
        raise DlmcError(f"{root}: this artifact runs on {name}, which needs {', '.join(missing)}{hint}")
    manifest = root / "manifest.json"  # read_manifest checked the entry's types, not what each backend needs
    missing = [role for role in FILES[name] if role not in entry.get("files", {})]
    if missing:
        raise DlmcError(f"{manifest}: backend.files.{missing[0]}: required by the {name} backend")
    named = name in NAMED_WEIGHTS and "weights" in entry["files"]  # a frozen inductor package has none
    if named and not all(role in entry.get("state", {}) for role in STATE):
        raise DlmcError(f"{manifest}: backend.state: needs the lists {', '.join(STATE)}")
    built_for = torch.device(entry.get("device", "cpu")).type
    check_device(device)
    return LOADERS[name](root, entry, device, built_for, weights)


# ---------------------------------------------------------------------------------------------
# eager: torch.export's JSON graph + safetensors
# ---------------------------------------------------------------------------------------------


def load_eager(root: Path, entry: dict[str, Any], device: str, built_for: str,
               weights: WeightFiles | None = None) -> Step:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    import dlmc.quant.ops  # noqa: F401  (registers the torch.ops.dlmc operators a quantized graph calls)
    import dlmc.models.grouped  # noqa: F401  (torch.ops.dlmc.grouped_mm, which MoE experts call)

    # loaded on the target device, so moving the program below keeps these tensors (shared, not copied)
    state, constants = (weights or WeightFiles()).state(root, entry, device)
    graph = (root / entry["files"]["graph"]).read_bytes()
    if b"dlmc_kernels" in graph:  # a triton_kernels step: register its ops (importing them imports triton)
        import dlmc.kernels.ops  # noqa: F401
    try:
        # State and constants are passed as tensors, so the deserializer unpickles nothing.
        exported = deserialize(SerializedArtifact(graph, state, constants, b""))
    except Exception as e:
        raise DlmcError(
            f"{root / entry['files']['graph']}: cannot load the step graph ({type(e).__name__}: {e})"
        ) from None
    if torch.device(device).type != "cpu" or built_for != "cpu":
        exported = torch.export.passes.move_to_device_pass(exported, device)
    module = exported.module()

    def step(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return module(*inputs)

    step.weights = {**state, **constants}  # type: ignore[attr-defined]  (what the module reads, not copies)
    return step


# ---------------------------------------------------------------------------------------------
# inductor: an AOTInductor package + safetensors (or, frozen, the package alone)
# ---------------------------------------------------------------------------------------------


def load_inductor(root: Path, entry: dict[str, Any], device: str, built_for: str,
                  weights: WeightFiles | None = None) -> Step:
    from torch._inductor import aoti_load_package

    import dlmc.kernels.ops  # noqa: F401  (AOTInductor calls a triton_kernels step's ops through the dispatcher)
    import dlmc.kernels.materialize  # noqa: F401  (torch.ops.dlmc.materialize: RoPE's tables on the CPU)
    import dlmc.models.grouped  # noqa: F401  (torch.ops.dlmc.grouped_mm, which MoE experts call)

    if torch.device(device).type != built_for:
        raise DlmcError(
            f"{root}: this inductor artifact was compiled for {built_for}; recompile it with device '{device}'"
        )
    package = root / entry["files"]["package"]
    try:
        runner = aoti_load_package(str(package), device_index=cuda_index(device))
    except Exception as e:
        raise DlmcError(f"{package}: cannot load the AOTInductor package ({type(e).__name__}: {e})") from None
    if "weights" not in entry["files"]:  # frozen: the package carries its (prepacked) weights
        return runner
    state, constants = (weights or WeightFiles()).state(root, entry, device)
    tensors = {**state, **constants}
    try:
        # user-managed: the runner reads these tensors in place (no copy of its own), so the programs that
        # share a weights file share its memory; the step keeps them alive
        attach_weights(runner, tensors, user_managed=True)
    except Exception as e:
        raise DlmcError(
            f"{package}: weights do not fit the compiled package ({type(e).__name__}: {_first_line(e)})"
        ) from None

    def step(*inputs: torch.Tensor) -> Any:
        return runner(*inputs)

    step.weights = tensors  # type: ignore[attr-defined]  (what the runner points into)
    return step


def attach_weights(runner: Any, tensors: dict[str, torch.Tensor], user_managed: bool = False) -> None:
    """Hand an AOTInductor package the weights it was compiled without. It names the ones it needs
    (small folded constants may have been compiled into the code); all of those must be supplied."""
    needed = runner.get_constant_fqns()
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise KeyError(f"weights file lacks '{missing[0]}'")
    runner.load_constants({name: tensors[name] for name in needed}, check_full_update=True, user_managed=user_managed)


# ---------------------------------------------------------------------------------------------
# onnxrt: a standard ONNX model whose external data lives in safetensors
# ---------------------------------------------------------------------------------------------

ORT_PROVIDERS = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider",)}
ORT_LEVELS = ("disable", "basic", "extended", "all")
ORT_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def open_session(path: Path, providers: tuple[str, ...], optimization: str, device: str) -> Any:
    """An onnxruntime session on exactly the requested providers. onnxruntime falls back to the CPU
    when a provider fails to load; that is refused here, never silently accepted."""
    import onnxruntime as ort

    wanted = list(providers or ORT_PROVIDERS[torch.device(device).type])
    index = cuda_index(device)
    # A GPU provider runs on the device the user named (cuda:N), not on GPU 0 whatever was asked.
    chosen = [(name, {"device_id": str(index)}) if name in ORT_GPU_PROVIDERS and index >= 0 else name
              for name in wanted]
    options = ort.SessionOptions()
    levels = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    )
    options.graph_optimization_level = levels[ORT_LEVELS.index(optimization)]
    options.log_severity_level = 3  # errors only; a failed provider is checked below
    # int4 DequantizeLinear + MatMul is fused into MatMulNBits, by default with int8-quantized
    # activations (accuracy level 4: logits ~1% off); 0 keeps the float accumulation the graph states.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    active = session.get_providers()
    if active[0] != wanted[0]:
        raise DlmcError(f"{path}: onnxruntime could not start {wanted[0]} (it would run on {active[0]})")
    return session


def session_step(session: Any, device: str | torch.device = "cpu") -> Step:
    """The session as a step: inputs in the model's input order, outputs as a tuple (or the one tensor).
    On the CPU the inputs go in as numpy views; on a GPU they are bound in place (`bound_step`)."""
    if torch.device(device).type != "cpu":
        return bound_step(session, device)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    def step(*inputs: torch.Tensor) -> Any:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(input_names, inputs, strict=True)}
        outputs = [torch.from_numpy(o).to(inputs[0].device) for o in session.run(output_names, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return step


def bound_step(session: Any, device: str | torch.device) -> Step:
    """The session as a step whose inputs and outputs stay on `device` (IOBinding): torch tensors are
    bound by pointer and onnxruntime's outputs come back through DLPack, so a GPU step never copies
    the logits [B, L, V] through host memory. bfloat16 is bound by its ONNX type (numpy has none)."""
    device = torch.device(device)
    where, index = ("cuda", max(cuda_index(device), 0)) if device.type == "cuda" else ("cpu", 0)
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    def step(*inputs: torch.Tensor) -> Any:
        binding = session.io_binding()
        bound = [t.detach().to(device).contiguous() for t in inputs]  # alive until the run is over
        for name, t in zip(input_names, bound, strict=True):
            if t.dtype not in ONNX_TYPES:
                raise DlmcError(f"onnxrt: input {name} is {t.dtype}, which dlmc cannot bind to onnxruntime")
            binding.bind_input(name, where, index, ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
        for name in output_names:
            binding.bind_output(name, where, index)  # onnxruntime allocates it there
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the inputs were written on torch's stream
        session.run_with_iobinding(binding)
        outputs = [torch.from_dlpack(value) for value in binding.get_outputs()]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return step


ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
              torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}
"""torch dtype -> ONNX TensorProto element type, for binding a tensor by pointer."""


def load_onnxrt(root: Path, entry: dict[str, Any], device: str, built_for: str,
                weights: WeightFiles | None = None) -> Step:
    model = root / entry["files"]["model"]
    try:
        session = open_session(model, tuple(entry.get("providers", ())), entry.get("optimization", "all"), device)
    except DlmcError:
        raise
    except Exception as e:
        raise DlmcError(f"{model}: onnxruntime cannot load the model ({type(e).__name__}: {_first_line(e)})") from None
    return session_step(session, device)


# ---------------------------------------------------------------------------------------------
# tensorrt: torch_tensorrt's ExportedProgram with serialized engines
# ---------------------------------------------------------------------------------------------


def load_tensorrt(root: Path, entry: dict[str, Any], device: str, built_for: str,
                  weights: WeightFiles | None = None) -> Step:
    if torch.device(device).type != "cuda":
        raise DlmcError(f"{root}: a TensorRT artifact runs only on a CUDA device, not '{device}'")
    program = root / entry["files"]["program"]
    audit_pt2(program)
    import torch_tensorrt

    import dlmc.quant.ops  # noqa: F401  (a quantized step's torch.ops.dlmc nodes must resolve when it loads)

    try:
        module = torch_tensorrt.load(str(program)).module()
    except Exception as e:
        raise DlmcError(
            f"{program}: torch_tensorrt cannot load the engine ({type(e).__name__}: {_first_line(e)})"
        ) from None
    return module


SAFE_PAYLOADS = ("weight_", "tensor_", "custom_obj_")
"""Raw tensor bytes, and torchbind objects; never "opaque_obj_" (Python pickle)."""


def audit_pt2(path: Path) -> None:
    """Refuse a .pt2/.ep archive that would make torch.export.load unpickle Python objects.

    torch.export.load unpickles (a) weights or constants flagged `use_pickle` (tensor subclasses),
    (b) "opaque" constants, and (c) example inputs, falling back to full pickle when the restricted
    loader refuses them. Plain tensors are raw bytes and TensorRT engines are torchbind objects
    (TorchScript's own deserializer, which builds only registered C++ classes); those are allowed.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DlmcError(f"{path}: not a readable .pt2 archive ({e})") from None
    with archive:
        for name in archive.namelist():
            in_state = "/data/weights/" in name or "/data/constants/" in name
            if in_state and name.endswith(".pt"):  # the legacy layout: one pickled state dict
                raise DlmcError(f"{path}: '{name}' is a pickled state dict; refusing to load it")
            if in_state and name.endswith("_config.json"):
                config = json.loads(archive.read(name)).get("config", {})
                for key, meta in config.items():
                    if meta.get("use_pickle"):
                        raise DlmcError(f"{path}: tensor '{key}' is stored pickled; refusing to load it")
                    if not str(meta.get("path_name", "")).startswith(SAFE_PAYLOADS):
                        raise DlmcError(f"{path}: constant '{key}' is a pickled Python object; refusing to load it")
            elif "/data/sample_inputs/" in name and archive.getinfo(name).file_size:
                _check_weights_only(path, name, archive.read(name))


def _check_weights_only(path: Path, name: str, payload: bytes) -> None:
    import io

    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except Exception:
        raise DlmcError(f"{path}: '{name}' holds more than tensors; refusing to load it") from None


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


LOADERS: dict[str, Callable[[Path, dict[str, Any], str, str, WeightFiles | None], Step]] = {
    "eager": load_eager,
    "inductor": load_inductor,
    "onnxrt": load_onnxrt,
    "tensorrt": load_tensorrt,
}
