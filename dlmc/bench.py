"""`dlmc bench`: speed and fidelity of a compiled artifact against the reference decoder, measured in
one run on the same prompts with the same decoder.

Each side is run `repeats` times after one warm-up; times are medians. Peak memory is how far the
resident set grew above its size when that side started, sampled while it decodes (so weights loaded
before are not counted); on CUDA it is the allocator's peak."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


import torch

from dlmc.decoding import decode
from dlmc.spec import DenoiserSpec


@dataclass(frozen=True)
class Measurement:
    name: str
    tokens_per_s: float
    seconds: float
    """Median wall time of one decode of all prompts."""
    seconds_per_step: float
    nfe: int
    peak_memory_mb: float
    agreement: float
    """Fraction of generated tokens equal to the reference decoder's."""
    output_ids: list[list[int]]
    step_seconds_per_step: float | None = None
    """For an artifact: the compiled step's own time per step; the rest of seconds_per_step is the
    runtime loop around it (decoding rule, cache bookkeeping, Python)."""

    def row(self) -> dict:
        d = asdict(self)
        d.pop("output_ids")
        return d


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class _PeakMemory:
    """Samples the resident set size from a thread while the block runs (CPU), or reads CUDA's peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = threading.Event()
        self.start = _rss_mb()
        self._highest = self.start

        def sample():
            while not self._stop.wait(0.005):
                self._highest = max(self._highest, _rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._highest, _rss_mb()) - self.start


def measure(
    name: str,
    model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    decoder: str,
    config,
    *,
    reference: list[list[int]] | None = None,
    repeats: int = 3,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> Measurement:
    times, step_times = [], []
    timer = _StepTimer(model, device)
    with torch.inference_mode(), _PeakMemory(device) as memory:
        decode(model, spec, prompts, decoder, config, seed=seed)  # warm-up: compilation, caches, allocator
        for _ in range(repeats):
            timer.seconds = 0.0
            start = time.perf_counter()
            with timer:
                result = decode(model, spec, prompts, decoder, config, seed=seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            step_times.append(timer.seconds)
    seconds = statistics.median(times)
    generated = sum(len(ids) for ids in result.output_ids)
    return Measurement(
        name=name,
        tokens_per_s=generated / seconds,
        seconds=seconds,
        seconds_per_step=seconds / result.nfe,
        nfe=result.nfe,
        peak_memory_mb=memory.peak,
        agreement=token_agreement(result.output_ids, reference or result.output_ids),
        output_ids=result.output_ids,
        step_seconds_per_step=statistics.median(step_times) / result.nfe if timer.engine else None,
    )


class _StepTimer:
    """Adds up the time spent inside an artifact's compiled step while a decode runs (synchronising
    CUDA around each call, which the split needs and a plain decode does not)."""

    def __init__(self, model, device: torch.device):
        self.engine = model if hasattr(model, "run_step") else None
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        if self.engine is not None:
            self._inner = self.engine._step
            self.engine._step = self._timed
        return self

    def __exit__(self, *exc):
        if self.engine is not None:
            self.engine._step = self._inner

    def _timed(self, *inputs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = self._inner(*inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


def token_agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    same = sum(a == b for out, ref in zip(outputs, reference, strict=True) for a, b in zip(out, ref, strict=True))
    return same / sum(len(ref) for ref in reference)


def format_table(rows: list[Measurement], baseline: str) -> str:
    base = next(r for r in rows if r.name == baseline)
    lines = [
        f"{'':12} {'tok/s':>9} {'s/step':>9} {'NFE':>6} {'peak MB':>9} {'agree':>7} {'speed-up':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r.name:12} {r.tokens_per_s:9.1f} {r.seconds_per_step:9.4f} {r.nfe:6d} {r.peak_memory_mb:9.0f} "
            f"{r.agreement:7.1%} {r.tokens_per_s / base.tokens_per_s:8.2f}x"
        )
    for r in rows:
        if r.step_seconds_per_step is not None:
            loop = r.seconds_per_step - r.step_seconds_per_step
            lines.append(
                f"{r.name}: per step {1000 * r.step_seconds_per_step:.2f} ms in the compiled step, "
                f"{1000 * loop:.2f} ms in the runtime loop around it ({loop / r.seconds_per_step:.0%})"
            )
    return "\n".join(lines)




def bench_prompts(spec: DenoiserSpec, tokenizer, count: int, seed: int) -> list[list[int]]:
    """Held-out task prompts when the tokenizer spells them (the embedded model), else random ids."""
    from dlmc import tasks

    examples = tasks.held_out(-(-count // len(tasks.TASKS)))
    if tokenizer is not None:
        encoded = [tokenizer.encode(e.prompt) for e in examples]
        if all(encoded) and tokenizer.decode(encoded[0]) == examples[0].prompt:
            return encoded[:count]
    generator = torch.Generator().manual_seed(seed)
    special = {spec.mask_token_id, spec.eos_token_id, spec.pad_token_id, spec.eot_token_id}
    pool = [i for i in range(min(spec.vocab_size, 1000)) if i not in special]
    return [[pool[int(i)] for i in torch.randint(len(pool), (16,), generator=generator)] for _ in range(count)]


def run_bench(
    artifact: str | Path, model_dir: str | Path | None, *, prompts: int, options: dict, repeats: int, seed: int
) -> dict:
    """Reference decoder on the original checkpoint vs the same decoder on the artifact's step."""
    import dlmc.runtime
    from dlmc.errors import DlmcError
    from dlmc.generation import decoder_config
    from dlmc.models import load_model

    engine = dlmc.runtime.load(artifact)
    manifest = engine.manifest
    model_dir = Path(model_dir or manifest["model"].get("path") or "")
    if not (model_dir / "config.json").is_file():
        raise DlmcError(f"{artifact}: the checkpoint it was compiled from is not at '{model_dir}'; pass --model")
    dtype = manifest["recipe"].get("capture", {}).get("dtype")
    reference = load_model(model_dir, device=engine.device, dtype=getattr(torch, dtype) if dtype else None)
    batch = bench_prompts(engine.spec, engine.tokenizer, prompts, seed)
    name, config = decoder_config(engine.spec, None, options, manifest.get("decode"))
    common = dict(repeats=repeats, seed=seed, device=engine.device)
    ref = measure("reference", reference, reference.spec, batch, name, config, **common)
    art = measure("artifact", engine, engine.spec, batch, name, config, reference=ref.output_ids, **common)
    rows = [ref, art]
    return {
        "artifact": str(artifact),
        "backend": manifest["backend"]["name"],
        "decoder": name,
        "config": asdict(config),
        "prompts": len(batch),
        "rows": [r.row() for r in rows],
        "table": format_table(rows, "reference"),
    }
