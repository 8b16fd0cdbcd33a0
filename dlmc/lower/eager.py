"""eager: the captured program run as is, through torch's own kernels.

The reference for every other backend, and the one with no extra dependency. The artifact holds the
graph as torch.export's JSON schema (`step.json`) and the weights and lifted constants in
safetensors: torch.export.load is not used because it unpickles some payloads (see ARTIFACT.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from dlmc.capture import StepProgram
from dlmc.lower import LowerSettings

GRAPH_FILE = "step.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True, kw_only=True)
class EagerSettings(LowerSettings):
    """No options: the graph runs op by op."""

    backend: ClassVar[str] = "eager"


class EagerStep:
    def __init__(self, program: StepProgram, device: str):
        self.program = program
        self.device = device
        self._module = program.module

    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return self._module(*inputs)

    def save(self, directory: Path) -> dict[str, Any]:
        from torch._export.serde.serialize import serialize

        # Only the graph goes through torch's serializer; weights, constants and example inputs are
        # left out of it (they would be pickled) and written as safetensors instead.
        graph = serialize(
            self.program.exported,
            serialize_state_dict=False,
            serialize_constants=False,
            serialize_example_inputs=False,
        ).exported_program
        (directory / GRAPH_FILE).write_bytes(graph)
        state = save_state(self.program.exported, directory / WEIGHTS_FILE)
        return {
            "name": "eager",
            "device": self.device,
            "files": {"graph": GRAPH_FILE, "weights": WEIGHTS_FILE},
            "state": state,
            "versions": {"torch": torch.__version__},
        }


def lower(program: StepProgram, settings: EagerSettings, device: str) -> EagerStep:
    return EagerStep(program, device)


def save_state(exported: torch.export.ExportedProgram, path: Path) -> dict[str, list[str]]:
    """Write the program's parameters, buffers and tensor constants to one safetensors file and return
    which name is which kind (the loader needs it to rebuild Parameters)."""
    sig = exported.graph_signature
    kinds = {
        "parameters": list(sig.parameters),
        "buffers": list(sig.buffers),
        "constants": [name for name in sig.lifted_tensor_constants],
    }
    tensors: dict[str, torch.Tensor] = {}
    for name in kinds["parameters"] + kinds["buffers"]:
        tensors[name] = exported.state_dict[name]
    for name in kinds["constants"]:
        if name in tensors:
            raise ValueError(f"constant '{name}' has the name of a weight")
        tensors[name] = exported.constants[name]
    seen: set[int] = set()
    flat = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory; copy the second and later sharers.
        storage = tensor.untyped_storage().data_ptr()
        flat[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    save_file(flat, str(path))
    return kinds
