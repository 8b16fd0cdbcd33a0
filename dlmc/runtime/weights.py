"""The safetensors weights of an artifact's programs, each file read once.

A multi-program artifact (DiffusionGemma: encoder and decoder) keeps one weights file for both programs
(ARTIFACT.md, "programs"); loading it once and handing both programs the same tensors keeps one copy in
memory too. A program whose tensor differs from the other's under the same name reads it from the file
under another key (its backend entry's `keys`, program name -> file key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dlmc.errors import DlmcError


class WeightFiles:
    """Loaded safetensors files by (path, device): programs naming the same file share its tensors."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[Path, str], dict[str, torch.Tensor]] = {}

    def tensors(self, path: Path, device: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        key = (path.resolve(), str(torch.device(device)))
        if key not in self._loaded:
            try:
                self._loaded[key] = load_file(str(path), device=device)
            except Exception as e:  # safetensors raises several types for a bad file
                raise DlmcError(f"{path}: not a readable safetensors file ({e})") from None
        return self._loaded[key]

    def state(self, root: Path, entry: dict[str, Any], device: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state_dict, constants) of one program, by its backend entry's `state` lists and `keys`."""
        path = root / entry["files"]["weights"]
        tensors = self.tensors(path, device)
        kinds, keys = entry["state"], entry.get("keys", {})
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise DlmcError(f"{root / 'manifest.json'}: backend.keys: must map tensor names to file keys")
        names = kinds["parameters"] + kinds["buffers"] + kinds["constants"]
        missing = [keys.get(n, n) for n in names if keys.get(n, n) not in tensors]
        if missing:
            raise DlmcError(f"{path}: missing tensor '{missing[0]}'")
        # A Parameter made from a loaded tensor is a view of the same storage, not a copy.
        state: dict[str, Any] = {n: torch.nn.Parameter(tensors[keys.get(n, n)], requires_grad=False)
                                 for n in kinds["parameters"]}
        state |= {n: tensors[keys.get(n, n)] for n in kinds["buffers"]}
        return state, {n: tensors[keys.get(n, n)] for n in kinds["constants"]}
