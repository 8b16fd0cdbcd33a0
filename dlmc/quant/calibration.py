"""Calibration: step inputs that look like denoising states, and the activation statistics of every
linear layer's input, gathered by running the captured step's graph once over them.

Two ways to run it:
  all at once (collect_stats)    the float step, every layer's statistics held together; for small
                                 models, where the difference from the sequential way is below the
                                 noise of the task metrics
  sequential (sequential_stats)  node by node over the whole calibration set, as the GPTQ paper
                                 quantizes: at each chosen linear its statistics are complete, the
                                 caller quantizes it, and every later layer sees the quantized
                                 layer's output; only one layer's statistics (a GPTQ Hessian is
                                 in^2 float64: 1.6 GB for a 14336-wide down-projection) are held
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlmc.capture import STEP_INPUTS
from dlmc.errors import DlmcError
from dlmc.quant.scheme import Calibration
from dlmc.quant.self_samples import self_samples
from dlmc.spec import DenoiserSpec

LINEAR = torch.ops.aten.linear.default
OUTLIER_RATIO = 6.0
"""A channel (token) is an outlier when its absmax exceeds this multiple of the median channel's (token's)."""


# ---------------------------------------------------------------------------------------------
# where the pass finds the checkpoint's tokenizer and leaves its report (set by the compiler)
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantSession:
    model_dir: Path | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None
    """The float model, which `source: self` samples from (else the step the pass receives)."""


_SESSION: ContextVar[QuantSession | None] = ContextVar("dlmc_quant_session", default=None)


@contextmanager
def quant_session(model_dir: str | Path | None, model: Any = None) -> Iterator[QuantSession]:
    """While active, the quantize pass reads the tokenizer from `model_dir`, samples from `model` for
    `source: self`, and appends its report."""
    session = QuantSession(Path(model_dir) if model_dir is not None else None, model=model)
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


def current_session() -> QuantSession | None:
    return _SESSION.get()


# ---------------------------------------------------------------------------------------------
# calibration inputs
# ---------------------------------------------------------------------------------------------


def calibration_inputs(
    config: Calibration, spec: DenoiserSpec, model_dir: Path | None, max_seq: int, model: Any = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of (input_ids, attention_mask, position_ids), each [B, L] with L = seq_len. `model`
    (a float model or a plain step) is what `source: self` samples from."""
    seq_len = min(config.seq_len, max_seq)
    rng = random.Random(config.seed)
    source = calibration_source(config.source, model_dir, "quantize.calibration.source")
    if source == "self":
        if model is None:
            raise DlmcError("quantize.calibration.source: self samples from the model, and none was given")
        if not _plain(model):
            raise DlmcError("quantize.calibration.source: self samples from the model, and this step has cache "
                            "inputs (run quantize before the caching pass, or use source: file)")
        pairs = self_samples(model, spec, config.samples, seq_len, config.seed)
        samples = [(prompt + generated, len(prompt)) for prompt, generated in pairs]
    else:
        samples = _token_rows(dataclasses.replace(config, source=source), spec, model_dir, rng)
    rows = [_row(ids, spec, seq_len, rng, masked_from) for ids, masked_from in samples]
    batches = []
    for start in range(0, len(rows), config.batch_size):
        input_ids = torch.tensor(rows[start : start + config.batch_size], dtype=torch.long)  # [B, L]
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)  # [B, L]
        position_ids = torch.arange(seq_len).expand_as(input_ids).contiguous()  # [B, L]
        batches.append((input_ids, attention_mask, position_ids))
    return batches


def _token_rows(
    config: Calibration, spec: DenoiserSpec, model_dir: Path | None, rng: random.Random
) -> list[tuple[list[int], int]]:
    """(token ids, index from which tokens may be masked) per sample."""
    if config.source == "random":
        special = {spec.mask_token_id, spec.pad_token_id, spec.eos_token_id}
        vocab = [i for i in range(spec.vocab_size) if i not in special]
        n = config.seq_len
        return [([rng.choice(vocab) for _ in range(n)], n // 2) for _ in range(config.samples)]
    tokenizer = _tokenizer(model_dir, config.source)
    if config.source == "file":
        path = Path(config.file)
        if not path.is_file():
            raise DlmcError(f"quantize.calibration.file: {path}: file not found")
        try:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise DlmcError(f"quantize.calibration.file: {path}: not a text file") from None
        if len(lines) < config.samples:
            raise DlmcError(
                f"quantize.calibration.file: {path} has {len(lines)} prompts, calibration.samples asks for "
                f"{config.samples} (at least {config.minimum})"
            )
        rows = [(tokenizer.encode(line), 0) for line in lines[: config.samples]]
        rows = [(ids, len(ids)) for ids, _ in rows]  # the prompt stays, the rest is masks to predict
    else:
        from dlmc import tasks

        examples = [tasks.sample(rng) for _ in range(config.samples)]
        rows = [(tokenizer.encode(e.prompt + e.answer), len(tokenizer.encode(e.prompt))) for e in examples]
    if any(len(ids) == 0 for ids, _ in rows):
        raise DlmcError(f"quantize.calibration: a {config.source} prompt encodes to no tokens")
    return rows


def calibration_source(source: str | None, model_dir: Path | None, field: str) -> str:
    """The calibration source that runs: the given one, else tasks for the embedded model and self for
    any other. The toy tasks describe the embedded model only; any other checkpoint is refused them."""
    from dlmc.generation import is_embedded_model

    embedded = is_embedded_model(model_dir)
    if source == "tasks" and not embedded:
        raise DlmcError(f"{field}: tasks are the embedded model's toy tasks, not this checkpoint's data; "
                        "use source: file (your prompts) or source: self (sequences the model writes)")
    return source or ("tasks" if embedded else "self")


def _plain(model: Any) -> bool:
    """A model the decoders can drive: an eager model, or a step with no inputs beyond the plain three."""
    signature = getattr(model, "signature", None)
    return signature is None or tuple(t.name for t in signature.inputs) == STEP_INPUTS


def _tokenizer(model_dir: Path | None, source: str) -> Any:
    from dlmc.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir) if model_dir is not None else None
    if tokenizer is None:
        raise DlmcError(
            f"quantize.calibration.source: '{source}' needs the checkpoint's tokenizer, and there is none "
            "(use source: random for a checkpoint without one)"
        )
    return tokenizer


def _row(ids: list[int], spec: DenoiserSpec, seq_len: int, rng: random.Random, masked_from: int) -> list[int]:
    """Crop/extend to seq_len with mask tokens, then mask a random fraction t of the tokens after
    `masked_from`: what the step sees part-way through denoising."""
    row = (ids + [spec.mask_token_id] * seq_len)[:seq_len]
    t = rng.random()
    for i in range(min(masked_from, seq_len), seq_len):
        if rng.random() < t:
            row[i] = spec.mask_token_id
    return row


# ---------------------------------------------------------------------------------------------
# activation statistics of each linear's input
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """Statistics of the input x [rows, in] of one linear layer over the calibration set."""

    rows: int = 0
    absmax: torch.Tensor | None = None  # [in] max |x_j|
    abssum: torch.Tensor | None = None  # [in] sum |x_j|
    xtx: torch.Tensor | None = None  # [in, in] float64 sum x^T x (for GPTQ)
    token_absmax: list[torch.Tensor] = field(default_factory=list)  # per row max_j |x_j|
    sample: list[torch.Tensor] = field(default_factory=list)  # kept rows [k, in]

    def add(self, x: torch.Tensor, keep: int, generator: torch.Generator, hessian: bool) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()  # [n, in]; statistics live on the host
        a = x.abs()
        self.absmax = a.amax(0) if self.absmax is None else torch.maximum(self.absmax, a.amax(0))
        self.abssum = a.sum(0) if self.abssum is None else self.abssum + a.sum(0)
        if hessian:
            xtx = x.double().T @ x.double()
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.token_absmax.append(a.amax(1))
        self.rows += x.shape[0]
        if keep:
            self.sample.append(x[torch.randperm(x.shape[0], generator=generator)[:keep]])

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abssum / self.rows

    def hessian(self) -> torch.Tensor:
        return (2 * self.xtx / self.rows).float()

    def rows_kept(self) -> torch.Tensor:
        return torch.cat(self.sample)

    def outliers(self) -> dict[str, float]:
        """Outlier statistics of the report: channel outliers (large on every token) and massive
        activations (huge on few tokens)."""
        channel = self.absmax
        median = channel.median().clamp(min=1e-12)
        tokens = torch.cat(self.token_absmax)
        token_median = tokens.median().clamp(min=1e-12)
        return {
            "absmax": round(float(channel.max()), 4),
            "channel_absmax_median": round(float(median), 4),
            "max_over_median": round(float(channel.max() / median), 2),
            "outlier_channels": int((channel > OUTLIER_RATIO * median).sum()),
            "massive_token_fraction": round(float((tokens > OUTLIER_RATIO * token_median).float().mean()), 4),
        }


def collect_stats(
    gm: torch.fx.GraphModule,
    flat_state: list[Any],
    batches: list[tuple[torch.Tensor, ...]],
    linears: dict[str, list[torch.fx.Node]],
    *,
    hessian_for: set[str],
    max_rows: int,
    seed: int,
) -> dict[str, LayerStats]:
    """Run the step's graph (lifted weights first, then the user inputs) on every batch and record the
    input of each linear in `linears` (layer name -> the linear nodes using that weight)."""
    watched = {node: name for name, nodes in linears.items() for node in nodes}
    stats = {name: LayerStats() for name in linears}
    total_rows = sum(b[0].numel() for b in batches)
    generator = torch.Generator().manual_seed(seed)

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n in watched:
                x = self.env[n.args[0]]
                name = watched[n]
                _check_finite(x, name)
                keep = math.ceil(max_rows * x[..., 0].numel() / total_rows / max(1, len(linears[name])))
                stats[name].add(x, keep, generator, name in hessian_for)
            return super().run_node(n)

    recorder = Recorder(gm)
    device = next((t.device for t in flat_state if isinstance(t, torch.Tensor)), torch.device("cpu"))
    with torch.no_grad():
        for batch in batches:
            recorder.run(*flat_state, *(t.to(device) for t in batch))
    return stats


Replacement = Callable[..., torch.Tensor]
"""The quantized layer in place of aten.linear(x [..., in], weight, bias?) -> [..., out]."""


def sequential_stats(
    gm: torch.fx.GraphModule,
    flat_state: list[Any],
    batches: list[tuple[torch.Tensor, ...]],
    linears: dict[str, list[torch.fx.Node]],
    on_layer: Callable[[str, LayerStats], Replacement],
    *,
    hessian_for: set[str],
    max_rows: int,
    seed: int,
) -> None:
    """Run the graph one node at a time over every batch. When the last linear node of a layer in
    `linears` is reached, its statistics over the whole calibration set go to `on_layer(name, stats)`,
    which quantizes it and returns the function that computes that node from then on."""
    last_node = {name: nodes[-1] for name, nodes in linears.items()}
    layer_of = {node: name for name, nodes in linears.items() for node in nodes}
    stats = {name: LayerStats() for name in linears}
    total_rows = sum(b[0].numel() for b in batches)
    generator = torch.Generator().manual_seed(seed)
    device = next((t.device for t in flat_state if isinstance(t, torch.Tensor)), torch.device("cpu"))
    runs = []  # one interpreter per batch; their environments advance together
    for batch in batches:
        run = torch.fx.Interpreter(gm)  # frees each value after its last use
        run.args_iter = iter(gm.graph.process_inputs(*flat_state, *(t.to(device) for t in batch)))
        runs.append(run)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            name = layer_of.get(node)
            if name is not None:
                for run in runs:
                    x = run.env[node.args[0]]
                    _check_finite(x, name)
                    keep = math.ceil(max_rows * x[..., 0].numel() / total_rows / max(1, len(linears[name])))
                    stats[name].add(x, keep, generator, name in hessian_for)
            if name is not None and node is last_node[name]:
                replacement = on_layer(name, stats.pop(name))
                for run in runs:
                    args, _ = run.fetch_args_kwargs_from_env(node)
                    run.env[node] = replacement(*args)
            else:
                for run in runs:
                    run.env[node] = run.run_node(node)
            for run in runs:
                for used in run.user_to_last_uses.get(node, ()):
                    del run.env[used]


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise DlmcError(
            f"quantize.calibration: non-finite activations (NaN/inf) at the input of {name}; "
            "the model or the calibration prompts are broken"
        )
