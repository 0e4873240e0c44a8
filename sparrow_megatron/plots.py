"""Every PNG the project writes: the run's tail heatmap (step x position bin, p5), reward and eval
curves, KV budget schedules, a tail report by position, the calibration heatmap (budget x bin).

Figures are built on matplotlib's object API with the Agg canvas, so importing this module never
switches the global backend of whoever imports it (a notebook, a test). Each `*_figure` function
returns the Figure (tests inspect its data); `save_png` writes it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.tails import TailReport


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def tail_heatmap_figure(
    steps: Sequence[int],
    bin_starts: Sequence[int],
    matrix: np.ndarray,
    tau: float,
    bin_width: int,
    title: str = "p5 acceptance by position bin",
) -> Figure:
    """Rows = steps, columns = bins; diverging colours centred on tau (red below), grey where empty."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (len(steps), len(bin_starts)):
        raise ValueError(f"matrix {matrix.shape} does not match {len(steps)} steps x {len(bin_starts)} bins")
    fig = Figure(figsize=(max(6.0, 0.35 * len(bin_starts) + 3), max(3.0, 0.18 * len(steps) + 2)))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn"].with_extremes(bad="#d0d0d0")
    finite = matrix[np.isfinite(matrix)]
    vmin = min(float(finite.min()) if finite.size else tau, tau - 1e-3)
    norm = TwoSlopeNorm(vcenter=tau, vmin=vmin, vmax=max(1.0, tau + 1e-3))
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        aspect="auto",
        cmap=cmap,
        norm=norm,
        interpolation="nearest",
        origin="lower",
    )
    ax.set_xticks(range(len(bin_starts)))
    ax.set_xticklabels(
        [f"{s // 1000}k" if s % 1000 == 0 else str(s) for s in bin_starts], rotation=90, fontsize=7
    )
    step_ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int) if len(steps) else []
    ax.set_yticks(step_ticks)
    ax.set_yticklabels([str(steps[i]) for i in step_ticks])
    ax.set_xlabel(f"position bin start (tokens, width {bin_width})")
    ax.set_ylabel("step")
    ax.set_title(f"{title} (tau = {tau})")
    fig.colorbar(image, ax=ax, label="p5 acceptance")
    fig.tight_layout()
    return fig


def reward_figure(
    steps: Sequence[int],
    series: Mapping[str, Sequence[float]],
    ylabel: str = "reward",
    title: str = "reward",
    smooth: int = 0,
) -> Figure:
    """One line per series (e.g. train reward, eval mean@k); with smooth > 1, a moving average too."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for label, values in series.items():
        values = np.asarray(values, dtype=float)
        if values.shape != (len(steps),):
            raise ValueError(f"series '{label}' has {values.size} values for {len(steps)} steps")
        (line,) = ax.plot(
            steps,
            values,
            marker="." if len(steps) < 50 else None,
            label=label,
            alpha=0.45 if smooth > 1 else 1.0,
        )
        if smooth > 1 and len(values) >= smooth:
            kernel = np.ones(smooth) / smooth
            ax.plot(
                steps[smooth - 1 :],
                np.convolve(values, kernel, mode="valid"),
                color=line.get_color(),
                label=f"{label} ({smooth}-step mean)",
            )
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


_LINESTYLES = ("-", "-.", ":", (0, (6, 2)))  # "--" is the dense line
_MARKERS = ("o", "s", "^", "D", "v", "P")


def schedule_figure(
    schedules: Mapping[str, Schedule | None] | Sequence[Schedule],
    max_len: int | None = None,
    title: str = "KV budget schedule",
) -> Figure:
    """Budget (tokens) against total position for several schedules, with dense (budget = L) for scale.

    A dense bin (budget None) is drawn on the dense line; past its last bin a schedule holds.
    """
    if not isinstance(schedules, Mapping):
        names = Counter(s.name for s in schedules)  # two files of one name are both drawn
        schedules = {
            s.name if names[s.name] == 1 else f"{s.name} #{i + 1}": s for i, s in enumerate(schedules)
        }
    named = {k: v for k, v in schedules.items() if v is not None}
    if max_len is None:
        max_len = max((len(s.budgets) + 1) * s.bin_width for s in named.values()) if named else 32768
    positions = np.arange(0, max_len + 1, max(1, max_len // 2000))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(positions, positions, color="0.6", linestyle="--", label="dense (all L tokens)")
    # Schedules often coincide (a controller change touches one bin): each later line is thinner, in
    # its own dash pattern, with markers shifted along x, so one drawn exactly over another still
    # leaves the earlier visible around it.
    n = len(named)
    widths = np.linspace(3.2, 1.2, n) if n > 1 else [1.8]
    every = max(1, len(positions) // 8)
    for i, (label, s) in enumerate(named.items()):
        budgets = [s.budget_at(int(L)) for L in positions]
        ax.step(
            positions,
            [L if b is None else b for L, b in zip(positions, budgets, strict=True)],
            where="post",
            label=label,
            linewidth=widths[i],
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            marker=_MARKERS[i % len(_MARKERS)],
            markevery=(i * every // max(n, 1), every),
            markersize=5,
            alpha=0.9,
        )
    tops = [b for s in named.values() for b in s.budgets if b is not None]
    ax.set_ylim(0, max(tops, default=max_len) * 1.15)
    ax.set_xlim(0, max_len)
    ax.set_xlabel("total position (prompt + generated tokens)")
    ax.set_ylabel("KV budget (tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tails_figure(report: TailReport, tau: float | None = None, title: str = "") -> Figure:
    """p5 (with its bounds) and mean acceptance per position bin."""
    centres = [b.centre for b in report.bins]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot(centres, [b.mean for b in report.bins], "o-", label="mean")
    ax.plot(centres, [b.p5 for b in report.bins], "s-", label="p5 (estimate)")
    if report.bins and report.bins[0].p5_lower is not None:
        lower, upper = [b.p5_lower for b in report.bins], [b.p5_upper for b in report.bins]
        ax.fill_between(centres, lower, upper, alpha=0.2, label="p5 bounds")
    if tau is not None:
        ax.axhline(tau, color="red", linestyle="--", label=f"tau = {tau}")
    ax.set_xlabel("absolute position (prompt + generated)")
    ax.set_ylabel("acceptance rate")
    ax.set_title(title or f"Acceptance by position (bins of {report.bin_width})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heatmap_figure(
    values: np.ndarray,
    row_labels: Sequence[object],
    col_labels: Sequence[object],
    title: str,
    xlabel: str,
    ylabel: str,
    tau: float | None = None,
) -> Figure:
    """A labelled heatmap (e.g. candidate budget x bin -> p5); NaN cells blank, cells below tau marked x."""
    values = np.asarray(values, dtype=float)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values {values.shape} do not match {len(row_labels)} x {len(col_labels)} labels")
    fig = Figure(figsize=(max(6, 0.5 * len(col_labels)), max(3, 0.4 * len(row_labels))))
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(values),
        aspect="auto",
        cmap="viridis",
        vmin=np.nanmin(values) if np.isfinite(values).any() else 0,
        vmax=1.0,
    )
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=60, fontsize=7)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=7)
    if tau is not None:
        for i, j in zip(*np.nonzero(values < tau), strict=True):
            ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("" if tau is None else f" (x: below tau {tau})"))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def plot_tail_heatmap(path: str | Path, steps, bin_starts, matrix, tau: float, bin_width: int, **kw) -> Path:
    return save_png(tail_heatmap_figure(steps, bin_starts, matrix, tau, bin_width, **kw), path)


def plot_rewards(path: str | Path, steps, series: Mapping[str, Sequence[float]], **kw) -> Path:
    return save_png(reward_figure(steps, series, **kw), path)


def plot_schedules(path: str | Path, schedules, max_len: int | None = None, **kw) -> Path:
    return save_png(schedule_figure(schedules, max_len, **kw), path)


def plot_tails(path: str | Path, report: TailReport, tau: float | None = None, **kw) -> Path:
    return save_png(tails_figure(report, tau, **kw), path)


def plot_heatmap(path: str | Path, values, row_labels, col_labels, **kw) -> Path:
    return save_png(heatmap_figure(values, row_labels, col_labels, **kw), path)
