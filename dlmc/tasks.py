"""Synthetic tasks with checkable answers: the data the embedded default model is trained on and the
benchmark its quality is measured with. Every prompt ends with ':'; the answer follows it.

Each task has a fixed layout (fixed-width numbers and words), so an answer character sits at a fixed
distance from the characters it depends on: a 3M-parameter model learns them in well under an hour
of CPU time, while the answers still have to be computed (carries, reversal, counting).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
COUNT_LENGTH = 30
"""Numbers per count answer: 30 three-digit numbers make a 119-character answer."""


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _count(rng: random.Random) -> Example:
    # The long-answer task: 30 consecutive three-digit numbers.
    start = rng.randint(100, 999 - COUNT_LENGTH + 1)
    return Example("count", f"count {start}:", " ".join(str(n) for n in range(start, start + COUNT_LENGTH)))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example("add", f"add {a}+{b}:", f"{a + b:03d}")


def _reverse(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS) for _ in range(10))
    return Example("reverse", f"reverse {word}:", word[::-1])


def _shift(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS) for _ in range(10))
    return Example("shift", f"shift {word}:", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word))


TASKS = {"count": _count, "add": _add, "reverse": _reverse, "shift": _shift}


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
