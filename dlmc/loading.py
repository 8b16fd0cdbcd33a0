"""One way to get something to decode from a path: a compiled artifact, a checkpoint directory, or the
embedded default model. Shared by the CLI, the benchmark sweep and the lm-evaluation-harness adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlmc.errors import DlmcError

DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class Decodable:
    model: Any
    """The eager model, or for an artifact the runtime engine (its compiled step)."""
    spec: Any
    tokenizer: Any
    defaults: dict = field(default_factory=dict)
    """An artifact's decode defaults (`manifest["decode"]`); empty for a checkpoint."""


def is_artifact(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "manifest.json").is_file()


def torch_dtype(dtype: str | None):
    import torch

    if dtype is not None and dtype not in DTYPES:
        raise DlmcError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype) if dtype is not None else None


def load_decodable(path: str | Path | None, device: str | None = None, dtype: str | None = None) -> Decodable:
    """A compiled artifact (its engine), a checkpoint directory (the eager model), or with no path the
    embedded default model. `dtype` applies to checkpoints only: an artifact's recipe fixed its dtype."""
    if is_artifact(path):
        import dlmc.runtime

        if dtype is not None:
            raise DlmcError("--dtype does not apply to a compiled artifact (its recipe fixed the dtype)")
        engine = dlmc.runtime.load(path, device=device)
        return Decodable(engine, engine.spec, engine.tokenizer, engine.manifest.get("decode") or {})
    from dlmc.generation import default_model_dir
    from dlmc.models import load_model
    from dlmc.tokenizer import load_tokenizer

    path = Path(path) if path is not None else default_model_dir()
    model = load_model(path, device=device or "cpu", dtype=torch_dtype(dtype))
    return Decodable(model, model.spec, load_tokenizer(path), {})
