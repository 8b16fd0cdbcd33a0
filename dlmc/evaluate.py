"""Task accuracy of a model on the held-out synthetic tasks (dlmc.tasks): the quality measure of the
embedded default model, of compiled artifacts and of approximate passes."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlmc import tasks
from dlmc.decoding.common import StepCallback
from dlmc.generation import Completion, generate
from dlmc.spec import DenoiserSpec
from dlmc.tokenizer import TextTokenizer


@dataclass(frozen=True)
class EvalReport:
    accuracy: float
    per_task: dict[str, float]
    examples: int
    nfe: int
    """Denoiser evaluations summed over batches (each batch counts its forward calls once)."""
    seconds: float
    completions: list[Completion] = field(repr=False)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "per_task": self.per_task, "examples": self.examples,
                "nfe": self.nfe, "seconds": round(self.seconds, 3)}


def evaluate(
    model,
    spec: DenoiserSpec,
    tokenizer: TextTokenizer,
    decoder: str,
    config,
    *,
    per_task: int = 25,
    batch_size: int = 25,
    seed: int = 0,
    on_batch: StepCallback | None = None,
) -> EvalReport:
    examples = tasks.held_out(per_task)
    completions: list[Completion] = []
    nfe, seconds = 0, 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        out = generate(model, spec, tokenizer, [tokenizer.encode(e.prompt) for e in chunk], decoder, config, seed=seed)
        completions += out
        nfe += out[0].batch_nfe
        seconds += out[0].batch_seconds
        if on_batch:
            on_batch(len(completions), len(examples))
    correct: dict[str, list[bool]] = {}
    for example, completion in zip(examples, completions):
        correct.setdefault(example.task, []).append(tasks.is_correct(example, completion.text or ""))
    hits = [ok for oks in correct.values() for ok in oks]
    return EvalReport(
        accuracy=sum(hits) / len(hits),
        per_task={task: sum(oks) / len(oks) for task, oks in sorted(correct.items())},
        examples=len(hits),
        nfe=nfe,
        seconds=seconds,
        completions=completions,
    )
