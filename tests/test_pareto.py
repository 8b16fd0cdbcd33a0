import pytest

from dlmc.pareto import pareto_front, plot_pareto


def test_front_keeps_the_points_nothing_beats_sorted_by_speed():
    points = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (3.0, 0.5), (2.0, 0.6), (3.0, 0.5)]
    # (1.5, 0.7) loses to (2.0, 0.8); (2.0, 0.6) too; equal points do not beat each other
    assert pareto_front(points) == [0, 1, 3, 5]


def test_one_point_is_its_own_front():
    assert pareto_front([(5.0, 0.1)]) == [0]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    path = plot_pareto(["a", "b", "c"], [1.0, 2.0, 1.5], [0.9, 0.8, 0.7], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
