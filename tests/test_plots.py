import numpy as np
import pytest
from matplotlib.image import imread

from sparrow_megatron.plots import (
    heatmap_figure,
    plot_heatmap,
    plot_rewards,
    plot_schedules,
    plot_tail_heatmap,
    plot_tails,
    reward_figure,
    schedule_figure,
    tail_heatmap_figure,
    tails_figure,
)
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule
from sparrow_megatron.sparsity.tails import tail_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tail_heatmap_data_colours_and_png(tmp_path):
    matrix = np.array([[0.95, 0.80, np.nan], [0.97, 0.84, 0.70], [0.99, 0.90, 0.88]])
    fig = tail_heatmap_figure([1, 2, 3], [0, 2000, 4000], matrix, tau=0.86, bin_width=2000)
    image = fig.axes[0].images[0]
    data = image.get_array()
    assert data.mask[0, 2] and not data.mask[1, 2]
    np.testing.assert_array_equal(data.filled(np.nan)[1], matrix[1])
    below = image.cmap(image.norm(0.80))
    above = image.cmap(image.norm(0.97))
    assert below[0] > below[1] and above[1] > above[0]  # red below tau, green above
    assert image.norm(0.86) == pytest.approx(0.5)  # centred on tau
    path = plot_tail_heatmap(tmp_path / "plots" / "tails.png", [1, 2, 3], [0, 2000, 4000], matrix, 0.86, 2000)
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0
    with pytest.raises(ValueError, match="does not match"):
        tail_heatmap_figure([1, 2], [0], matrix, 0.86, 2000)


def test_tail_heatmap_all_empty_does_not_fail(tmp_path):
    plot_tail_heatmap(tmp_path / "t.png", [1], [0], np.array([[np.nan]]), 0.86, 2000)


def test_reward_figure(tmp_path):
    steps = list(range(1, 11))
    rewards = [0.1 * s for s in steps]
    fig = reward_figure(steps, {"train": rewards, "eval": rewards[::-1]}, smooth=3)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [
        "train",
        "train (3-step mean)",
        "eval",
        "eval (3-step mean)",
    ]
    np.testing.assert_allclose(lines[0].get_ydata(), rewards)
    np.testing.assert_allclose(lines[1].get_ydata(), [0.2 + 0.1 * i for i in range(8)])
    assert plot_rewards(tmp_path / "r.png", steps, {"train": rewards}).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="series 'x' has 2 values for 10 steps"):
        reward_figure(steps, {"x": [1, 2]})


def test_schedule_figure_overlays_budgets():
    tiny = Schedule((64, None, 128), bin_width=100, name="tiny")
    fig = schedule_figure({"1.7b": PRESETS["qwen3-1.7b-0.86"], "4b": PRESETS["qwen3-4b-0.86"]}, max_len=40000)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["dense (all L tokens)", "1.7b", "4b"]
    x, y = lines[1].get_xdata(), lines[1].get_ydata()
    for position, budget in [(0, 512), (2500, 1024), (39000, 4096)]:
        assert y[np.searchsorted(x, position)] == budget
    fig = schedule_figure([tiny], max_len=400)
    x, y = fig.axes[0].get_lines()[1].get_xdata(), fig.axes[0].get_lines()[1].get_ydata()
    assert y[np.searchsorted(x, 150)] == 150  # a dense bin sits on the dense line
    assert y[np.searchsorted(x, 350)] == 128


def test_coinciding_schedules_stay_distinguishable():
    """A schedule drawn exactly over an earlier one: thinner, another dash and marker positions."""
    same = Schedule((256,), 256, name="tiny")
    lines = schedule_figure({"from step 1": same, "from step 5": same}, max_len=1500).axes[0].get_lines()[1:]
    assert lines[0].get_linewidth() > lines[1].get_linewidth()
    assert lines[0].get_linestyle() != lines[1].get_linestyle()
    assert lines[0].get_marker() != lines[1].get_marker()
    assert lines[0].get_markevery() != lines[1].get_markevery()


def test_plot_schedules_png(tmp_path):
    path = plot_schedules(tmp_path / "s.png", list(PRESETS.values()))
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_schedules_of_one_name_are_all_drawn():
    a, b = Schedule((96, 192), 128, name="custom"), Schedule((288, 288), 128, name="custom")
    labels = [line.get_label() for line in schedule_figure([a, b], max_len=300).axes[0].get_lines()]
    assert labels == ["dense (all L tokens)", "custom #1", "custom #2"]


def test_tails_figure_draws_mean_p5_and_tau(tmp_path):
    rng = np.random.default_rng(0)
    positions = np.arange(1, 601)
    alpha = np.clip(1.0 - positions / 2000 + 0.02 * rng.standard_normal(600), 0, 1)
    report = tail_report(alpha, positions, bin_width=200, tau=0.86)
    ax = tails_figure(report, tau=0.86).axes[0]
    mean, p5, tau = ax.get_lines()
    np.testing.assert_allclose(mean.get_ydata(), [b.mean for b in report.bins])
    np.testing.assert_allclose(p5.get_ydata(), [b.p5 for b in report.bins])
    assert list(tau.get_ydata()) == [0.86, 0.86]
    assert plot_tails(tmp_path / "t.png", report, tau=0.86).read_bytes()[:8] == PNG_MAGIC


def test_heatmap_marks_the_cells_below_tau(tmp_path):
    values = np.array([[0.5, 0.9, np.nan], [0.88, 0.95, 0.99]])
    fig = heatmap_figure(values, [256, 512], ["0-100", "100-200", "200-300"], "p5", "bin", "budget", tau=0.86)
    marks = [(t.get_position(), t.get_text()) for t in fig.axes[0].texts]
    assert marks == [((0, 0), "x")]  # NaN is not below tau
    with pytest.raises(ValueError, match="do not match"):
        heatmap_figure(values, [256], ["a", "b", "c"], "p5", "bin", "budget")
    path = plot_heatmap(
        tmp_path / "h.png", values, [256, 512], ["a", "b", "c"], title="p5", xlabel="x", ylabel="y"
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
