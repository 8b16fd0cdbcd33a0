"""`dlmc calibrate`: how much each transformer block of a checkpoint changes the residual stream,
measured the way a layer_skip budget is resolved at compile time, and the layers a budget would drop."""

from __future__ import annotations

from pathlib import Path

import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.models import load_model
from dlmc.passes.layer_skip import LayerSkip, resolve
from dlmc.passes.skip_calibration import Calibration
from dlmc.tokenizer import load_tokenizer


def calibrate_checkpoint(
    model_dir: str | Path, config: LayerSkip, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Calibration, tuple[int, ...]]:
    """The per-layer similarities of the captured step and the layers `config.budget` drops."""
    model = load_model(model_dir, device=device, dtype=dtype)
    program = capture(model, CaptureConfig())
    resolved, calibration = resolve(program, config, load_tokenizer(model_dir), model_dir, model)
    return calibration, resolved.layers
