import pytest

from dlmc.pareto import label_groups, pareto_front, place_labels, plot_pareto


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


def test_coinciding_points_share_one_label_and_distant_ones_keep_their_own():
    # speeds on a log axis spanning 10 .. 1000 (two decades), accuracy 0.5 .. 1.0
    speed = [10.0, 1000.0, 1000.0, 1010.0, 500.0, 10.0]
    quality = [1.0, 0.5, 0.5, 0.5, 0.5, 0.9]
    # 1000 and 1010 are 0.002 of the log span apart; 500 is 0.15 away (its own group); the second point
    # at speed 10 is 0.2 of the quality span below the first
    assert label_groups(speed, quality) == [[0], [1, 2, 3], [4], [5]]


def test_label_groups_chain_through_a_middle_point():
    speed = [100.0, 108.0, 116.0, 10.0]  # each step is 0.03 of the log span, the ends 0.06 apart
    quality = [0.9, 0.9, 0.9, 0.8]
    assert label_groups(speed, quality) == [[0, 1, 2], [3]]


def test_one_point_or_one_speed_needs_no_span():
    assert label_groups([5.0], [0.1]) == [[0]]
    assert label_groups([5.0, 5.0], [0.1, 0.9]) == [[0], [1]]


def test_placed_labels_do_not_overlap():
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 3))
    ax = figure.subplots()
    # six long labels on points packed closer than a label's width and height
    anchors = [(1.0 + 0.02 * i, 0.5 + 0.01 * (i % 2)) for i in range(6)]
    ax.scatter(*zip(*anchors))
    ax.set_xlim(0, 2)
    ax.set_ylim(0, 1)
    labels = place_labels(ax, anchors, [f"a long label number {i}" for i in range(6)])
    renderer = FigureCanvasAgg(figure).get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert [label.xy for label in labels] == anchors
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(6) for j in range(i))
