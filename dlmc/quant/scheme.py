"""What to do to one linear layer (Scheme), which layers get which (Rule), and the calibration set."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar, Literal

MIN_CALIBRATION_SAMPLES = 4


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """One quantization scheme. W8A16/W4A16: `activations: none`; W8A8: int8 weights per channel with
    int8 activations (`per_token` dynamic or `per_tensor` static), optionally with outlier handling."""

    weights: Literal["int8", "int4"] = "int8"
    group_size: int | None = None
    """Input channels per weight scale; None = one scale per output channel."""
    symmetric: bool = True
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    activations: Literal["none", "per_token", "per_tensor"] = "none"
    outliers: Literal["none", "smoothquant", "hadamard"] = "none"
    smooth_alpha: float = 0.5
    """SmoothQuant migration strength: s_j = max|X_j|^a / max|W_j|^(1-a)."""
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_block: int = 128
    awq_grid: int = 20

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ValueError("group_size: must be >= 1 (or null for per-channel)")
        if self.activations != "none":
            if self.weights != "int8" or self.group_size is not None or not self.symmetric:
                raise ValueError(
                    "activations: int8 activations need weights: int8, symmetric, per channel (group_size: null)"
                )
            if self.method == "awq":
                raise ValueError("method: awq is a weight-only method; use rtn or gptq with int8 activations")
        elif self.outliers != "none":
            raise ValueError("outliers: smoothquant/hadamard apply to int8 activations; set activations")
        if not 0 <= self.smooth_alpha <= 1:
            raise ValueError("smooth_alpha: must be in [0, 1]")
        if not 0 < self.gptq_damp < 1:
            raise ValueError("gptq_damp: must be in (0, 1)")
        if self.gptq_block < 1 or self.awq_grid < 1:
            raise ValueError("gptq_block and awq_grid: must be >= 1")

    @property
    def bits(self) -> int:
        return 4 if self.weights == "int4" else 8

    def label(self) -> str:
        act = "16" if self.activations == "none" else "8"
        parts = [f"W{self.bits}A{act}", self.method]
        parts.append(f"g{self.group_size}" if self.group_size else "per-channel")
        if not self.symmetric:
            parts.append("asym")
        if self.activations != "none":
            parts.append(self.activations.replace("_", "-"))
        if self.outliers != "none":
            parts.append(self.outliers + (f"(a={self.smooth_alpha})" if self.outliers == "smoothquant" else ""))
        return " ".join(parts)


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Layers whose name matches the glob `match` get `scheme`; `scheme: null` keeps them in float."""

    match: str
    scheme: Scheme | None = None


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The inputs calibration runs the step on."""

    source: Literal["tasks", "file", "self", "random"] | None = None
    """tasks: prompts and answers from dlmc.tasks, partly masked as in a denoising step (the embedded
    model's own tasks: refused for any other checkpoint); file: one prompt per line of `file`, followed
    by mask tokens; self: sequences the model writes itself (dlmc.quant.self_samples), partly masked;
    random: uniform token ids. None: tasks for the embedded model, self for any other."""
    file: str | None = None
    samples: int = 32
    """Sequences to calibrate on (a file must have at least this many non-empty lines)."""
    seq_len: int = 64
    batch_size: int = 8
    seed: int = 0
    max_rows: int = 1024
    """Activation rows kept per layer for AWQ's search and the SQNR in the report."""
    sequential: bool = False
    """Quantize layer by layer, each calibrated on the outputs of the layers already quantized (as
    GPTQ does), holding one layer's statistics at a time: what a 7-8B model needs. False: every
    layer's statistics from one float run, held together (fine for small models)."""

    minimum: ClassVar[int] = MIN_CALIBRATION_SAMPLES

    def __post_init__(self) -> None:
        if self.samples < self.minimum:
            raise ValueError(f"samples: {self.samples} is too few to calibrate on (at least {self.minimum})")
        if self.source == "file" and not self.file:
            raise ValueError("file: required when source is 'file'")
        if self.source != "file" and self.file:
            raise ValueError("file: only used with source: file")
        if self.seq_len < 2 or self.batch_size < 1 or self.max_rows < 16:
            raise ValueError("seq_len must be >= 2, batch_size >= 1, max_rows >= 16")


def scheme_for(layer: str, rules: tuple[Rule, ...], default: Scheme | None) -> Scheme | None:
    """The first rule whose glob matches `layer` decides; no match -> the default scheme."""
    for rule in rules:
        if fnmatch.fnmatchcase(layer, rule.match):
            return rule.scheme
    return default
