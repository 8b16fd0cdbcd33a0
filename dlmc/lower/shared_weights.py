"""One weights file for the programs of a multi-program artifact (DiffusionGemma's encoder and decoder).

The programs come from one model, so their parameters carry the same names and, unless a pass changed one
program's copy alone, the same bytes: those are written once. A tensor only one program has goes into
the same file. A name whose bytes differ between the programs (say, a constant folded differently) keeps
both: the other program's copy under `<prefix>/<name>`, recorded in its backend entry's `keys`, which the
runtime reads (dlmc.runtime.weights). Only backends whose loader reads tensors by name from safetensors
(eager, unfrozen inductor) can share; an onnxrt model's external data points at byte ranges of its own
file, and a frozen inductor package carries its weights inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dlmc.runtime.backends import NAMED_WEIGHTS


def can_share(entry: dict[str, Any]) -> bool:
    return entry["name"] in NAMED_WEIGHTS and "weights" in entry["files"] and "state" in entry


def share_weights(root: Path, main: dict[str, Any], other: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Fold `other`'s weights file (a path under `root`) into `main`'s, delete it, and return `other`'s
    backend entry naming `main`'s file (and `keys` where a name's bytes differ)."""
    from safetensors.torch import load_file, save_file

    if not (can_share(main) and can_share(other)):
        raise ValueError(f"share_weights: {main['name']} / {other['name']} steps do not read weights by name")
    path, theirs = root / main["files"]["weights"], root / other["files"]["weights"]
    tensors, extra = load_file(str(path)), load_file(str(theirs))
    keys = {}
    for name, tensor in extra.items():
        if name not in tensors:
            tensors[name] = tensor
        elif not same_bytes(tensors[name], tensor):
            key = f"{prefix}/{name}"
            if key in tensors:  # module and constant names have no "/", so this is a broken program
                raise ValueError(f"share_weights: both programs have a tensor named '{key}'")
            tensors[key], keys[name] = tensor, key
    save_file(tensors, str(path))
    theirs.unlink()
    entry = {**other, "files": {**other["files"], "weights": main["files"]["weights"]}}
    return {**entry, "keys": keys} if keys else entry


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (not ==: -0.0 == 0.0 and NaN != NaN would both mislead here)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
