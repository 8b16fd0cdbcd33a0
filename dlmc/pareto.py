"""The speed-quality Pareto front of a sweep, and its plot (matplotlib, the `plot` extra)."""

from __future__ import annotations

import math
import textwrap
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


LABEL_WIDTH = 44
"""Characters per line of a shared label."""


def label_groups(
    speed: Sequence[float], quality: Sequence[float], *, near_x: float = 0.04, near_y: float = 0.03
) -> list[list[int]]:
    """Points whose labels would overlap, grouped so that each group gets one label (its names listed).

    Distances are fractions of the plotted span, on the log speed axis and the linear quality axis (about
    one line of text on the quality axis). Points closer than that on both axes, directly or through a
    chain of such points, form one group; `place_labels` keeps the groups' labels apart. Groups and their
    members keep the input order."""
    xs = [math.log(s) for s in speed]
    x_span = (max(xs) - min(xs)) or 1.0
    y_span = (max(quality) - min(quality)) or 1.0
    parent = list(range(len(xs)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(xs)):
        for j in range(i):
            if abs(xs[i] - xs[j]) / x_span < near_x and abs(quality[i] - quality[j]) / y_span < near_y:
                parent[max(root(i), root(j))] = min(root(i), root(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(xs)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


LABEL_CORNERS = (((5, 5), "left", "bottom"), ((5, -5), "left", "top"), ((-5, 5), "right", "bottom"),
                 ((-5, -5), "right", "top"))
"""Where a label may sit around its point (offset in points, alignment), in order of preference."""


def place_labels(ax, anchors: Sequence[tuple[float, float]], texts: Sequence[str]) -> list:
    """Annotate each anchor (data coordinates) with its text at the first corner (LABEL_CORNERS) where it
    overlaps no label placed before it; where every corner is taken, the first, moved up one step at a
    time until it is free. Measured in pixels of the figure as laid out now. -> the annotations"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = ax.get_figure()
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw_without_rendering()  # settle the layout so that data -> pixel positions hold
    placed, boxes = [], []
    for anchor, text in zip(anchors, texts, strict=True):
        tries = list(LABEL_CORNERS) + [((5, 5 + 10 * k), "left", "bottom") for k in range(1, 30)]
        for offset, ha, va in tries:
            label = ax.annotate(text, anchor, textcoords="offset points", xytext=offset, ha=ha, va=va, fontsize=8)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in boxes):
                break
            label.remove()
        else:  # nowhere free: keep the preferred corner rather than no label
            label = ax.annotate(text, anchor, textcoords="offset points", xytext=LABEL_CORNERS[0][0], fontsize=8)
            box = label.get_window_extent(renderer)
        placed.append(label)
        boxes.append(box)
    return placed


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
    """Every point labelled with its name (coinciding points share one label, and no label covers another);
    the front drawn as a line through its points, the others grey."""
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
    ax.margins(y=0.12)  # room above the top point for its label
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)  # slow and inaccurate: the corner no decoding setting wants
    anchors, texts = [], []
    for group in label_groups(speed, quality):
        # one label per group at its slowest point, the names in speed order, wrapped to a few short lines
        group = sorted(group, key=lambda i: speed[i])
        anchors.append((speed[group[0]], quality[group[0]]))
        texts.append(textwrap.fill(", ".join(names[i] for i in group), width=LABEL_WIDTH, break_on_hyphens=False))
    place_labels(ax, anchors, texts)
    path = Path(path)
    try:
        figure.savefig(path, dpi=120)
    except OSError as e:
        raise DlmcError(f"--plot {path}: cannot write it ({e.strerror})") from None
    return path
