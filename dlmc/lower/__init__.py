"""Lowering: a StepProgram becomes a backend-specific compiled step.

One module per backend, each with its own small settings dataclass and one `lower(program, settings,
device)` returning that backend's step object. Every step object is callable like the program it was
lowered from (the signature's inputs -> logits, plus keys and values for a cached step), so the
compiler can check it against the captured program, and has `save(directory) -> dict`, which writes its files and returns the manifest's
"backend" entry. A backend that cannot run here is refused with one line; nothing falls back.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from dlmc.capture import StepProgram
from dlmc.device import device_kind, device_problem


class LowerSettings:
    """Base of backend settings. Subclasses are @dataclass(frozen=True, kw_only=True)."""

    backend: ClassVar[str]
    """The recipe's `lower.backend` value."""
    packages: ClassVar[tuple[str, ...]] = ()
    """Importable modules the backend needs beyond torch."""
    extra: ClassVar[str | None] = None
    """The dlmc extra that installs them."""
    needs_cuda: ClassVar[bool] = False
    moe_experts: ClassVar[str] = "grouped"
    """The form MoE experts are captured in for this backend (dlmc.models.moe): "tiled" where it cannot
    run torch.ops.dlmc.grouped_mm."""

    def unsupported(self, device: str, dtypes: frozenset[str]) -> list[str]:
        """Problems with honouring these settings on `device` for a step computing in `dtypes`."""
        return []


class LoweredStep(Protocol):
    def __call__(self, *inputs: torch.Tensor) -> Any:
        """The step's inputs in signature order -> logits, or a tuple (logits, keys, values) for a step
        with a K/V cache."""

    def save(self, directory: Path) -> dict[str, Any]: ...


from dlmc.lower import eager, inductor, onnxrt, tensorrt  # noqa: E402  (the closed list of backends)

LOWERINGS: dict[type[LowerSettings], Callable[..., LoweredStep]] = {
    eager.EagerSettings: eager.lower,
    inductor.InductorSettings: inductor.lower,
    onnxrt.OnnxRtSettings: onnxrt.lower,
    tensorrt.TensorRtSettings: tensorrt.lower,
}
BACKENDS: dict[str, type[LowerSettings]] = {settings.backend: settings for settings in LOWERINGS}
"""Recipe name -> settings type."""


def check_backend(settings: LowerSettings, device: str, dtypes: frozenset[str] = frozenset()) -> list[str]:
    """What stops this backend from running on this machine: missing packages, a missing device, or
    an option (or a compute dtype in `dtypes`) the backend cannot honour here. Empty when it can run."""
    kind = device_kind(device)
    if kind is None:  # nothing else can be checked against a device that does not exist
        return [device_problem(device)]
    problems = [p for p in (device_problem(device),) if p is not None]  # a missing GPU, beside the rest
    missing = [name for name in settings.packages if importlib.util.find_spec(name) is None]
    if missing:
        hint = f" (pip install 'dlmc[{settings.extra}]')" if settings.extra else ""
        problems.append(f"lower.backend: {settings.backend} needs the package(s) {', '.join(missing)}{hint}")
    if settings.needs_cuda and kind != "cuda":
        problems.append(f"lower.backend: {settings.backend} runs only on a CUDA device, and the device is '{device}'")
    if not missing:  # the backend's own checks may import its package
        problems += settings.unsupported(device, dtypes)
    return problems


def lower(program: StepProgram, settings: LowerSettings, device: str) -> LoweredStep:
    return LOWERINGS[type(settings)](program, settings, device)


__all__ = ["BACKENDS", "LOWERINGS", "LowerSettings", "LoweredStep", "check_backend", "lower"]
