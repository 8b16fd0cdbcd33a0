"""The speed-quality Pareto front of a sweep, and its plot (matplotlib, the `plot` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dlmc.errors import DlmcError


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed, quality) no other point beats: none is at least as fast and at
    least as good and better in one of the two. Sorted by speed."""
    front = []
    for i, (speed, quality) in enumerate(points):
        dominated = any(
            s >= speed and q >= quality and (s > speed or q > quality) for j, (s, q) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def check_plotting() -> None:
    """One line before any work when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DlmcError('--plot needs matplotlib: pip install -e ".[plot]"') from None


def plot_pareto(
    names: Sequence[str], speed: Sequence[float], quality: Sequence[float], path: str | Path, *,
    xlabel: str = "tokens / s", ylabel: str = "task accuracy", title: str = "speed vs quality",
) -> Path:
    """Every point labelled with its name; the front drawn as a line through its points, the others grey."""
    check_plotting()
    from matplotlib.figure import Figure

    points = list(zip(speed, quality, strict=True))
    front = set(pareto_front(points))
    figure = Figure(figsize=(7, 4.5), layout="constrained")  # no pyplot: no global state, no display
    ax = figure.subplots()
    ax.set_xscale("log")  # speed-ups span two orders of magnitude
    others = [i for i in range(len(points)) if i not in front]
    ax.scatter([speed[i] for i in others], [quality[i] for i in others], color="0.6", label="dominated", zorder=2)
    ordered = sorted(front, key=lambda i: speed[i])
    ax.plot([speed[i] for i in ordered], [quality[i] for i in ordered], "o-", color="tab:red", markersize=8,
            label="Pareto front", zorder=3)
    for i, name in enumerate(names):
        ax.annotate(name, (speed[i], quality[i]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    path = Path(path)
    try:
        figure.savefig(path, dpi=120)
    except OSError as e:
        raise DlmcError(f"--plot {path}: cannot write it ({e.strerror})") from None
    return path
