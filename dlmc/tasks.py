"""Synthetic tasks with checkable answers: the data the embedded default model is trained on and the
benchmark its quality is measured with. Every prompt ends with ':'; the answer follows it."""

from __future__ import annotations

import random
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _count(rng: random.Random) -> Example:
    # The long-answer task: up to 40 consecutive numbers (answers of ~10 to 120 characters).
    start = rng.randint(0, 150)
    end = start + rng.randint(3, 39 if start < 60 else 29)
    return Example("count", f"count {start} to {end}:", " ".join(str(n) for n in range(start, end + 1)))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 10 ** rng.randint(1, 4) - 1), rng.randint(0, 10 ** rng.randint(1, 4) - 1)
    return Example("add", f"add {a} + {b}:", str(a + b))


def _sort(rng: random.Random) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 16)))
    return Example("sort", f"sort {digits}:", "".join(sorted(digits)))


def _reverse(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 12)))
    return Example("reverse", f"reverse {word}:", word[::-1])


TASKS = {"count": _count, "add": _add, "sort": _sort, "reverse": _reverse}


def sample(rng: random.Random) -> Example:
    return TASKS[rng.choice(sorted(TASKS))](rng)


def held_out(n_per_task: int = 25, seed: int = 20261124) -> list[Example]:
    """The evaluation set; the training stream never yields one of these prompts."""
    rng = random.Random(seed)
    out, seen = [], set()
    for name in sorted(TASKS):
        while sum(e.task == name for e in out) < n_per_task:
            ex = TASKS[name](rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(ex)
    return out


def is_correct(example: Example, generated: str) -> bool:
    return generated.strip() == example.answer
