"""The one check of a device the user names (`--device`, `device=`): every entry point that takes one
calls it before any work, so a wrong name is one line, never a torch traceback halfway through."""

from __future__ import annotations

import torch

from dlmc.errors import DlmcError


def device_kind(device: str | torch.device) -> str | None:
    """"cpu" or "cuda" for a device name dlmc can run on (present here or not), None for any other."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        return None
    return kind if kind in ("cpu", "cuda") else None


def device_problem(device: str | torch.device) -> str | None:
    """Why `device` cannot be used on this machine, or None when it can."""
    if device_kind(device) is None:
        return f"device: '{device}' is not supported (use cpu, cuda or cuda:N)"
    kind = torch.device(device)
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            return f"device: '{device}' was asked for, but torch sees no CUDA device"
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            return f"device: '{device}' was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a DlmcError naming what is wrong with it."""
    problem = device_problem(device)
    if problem is not None:
        raise DlmcError(problem)
    return torch.device(device)


def cuda_index(device: str | torch.device) -> int:
    """The N of cuda:N; -1 for a device that names none (plain cuda: the current one) or is not CUDA."""
    device = torch.device(device)
    return device.index if device.type == "cuda" and device.index is not None else -1
