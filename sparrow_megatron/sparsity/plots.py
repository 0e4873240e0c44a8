"""PNG plots of the sparsity core's results: tails by position, schedules, calibration heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparrow_megatron.sparsity.schedule import Schedule  # noqa: E402
from sparrow_megatron.sparsity.tails import TailReport  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tails(report: TailReport, path: str | Path, tau: float | None = None, title: str = "") -> Path:
    """p5 (with its bounds) and mean acceptance per position bin."""
    centres = [b.centre for b in report.bins]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(centres, [b.mean for b in report.bins], "o-", label="mean")
    ax.plot(centres, [b.p5 for b in report.bins], "s-", label="p5 (estimate)")
    if report.bins and report.bins[0].p5_lower is not None:
        ax.fill_between(
            centres,
            [b.p5_lower for b in report.bins],
            [b.p5_upper for b in report.bins],
            alpha=0.2,
            label="p5 bounds",
        )
    if tau is not None:
        ax.axhline(tau, color="red", linestyle="--", label=f"tau = {tau}")
    ax.set_xlabel("absolute position (prompt + generated)")
    ax.set_ylabel("acceptance rate")
    ax.set_title(title or f"Acceptance by position (bins of {report.bin_width})")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_schedules(schedules: Sequence[Schedule], path: str | Path, max_len: int | None = None) -> Path:
    """Budget against position for one or several schedules (dense bins drawn at the position itself)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in schedules:
        end = max_len or s.bin_width * (len(s.budgets) + 1)
        positions = np.arange(1, end, max(1, end // 2000))
        budgets = [s.budget_at(int(p)) or p for p in positions]
        ax.step(positions, budgets, where="post", label=s.name)
    ax.set_xlabel("position (KV length at the decode step)")
    ax.set_ylabel("KV budget (tokens)")
    ax.set_title("KV budget schedules")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_heatmap(
    values: np.ndarray,
    row_labels: Sequence[object],
    col_labels: Sequence[object],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    tau: float | None = None,
) -> Path:
    """A labelled heatmap (e.g. candidate budget x bin -> p5, or step x bin -> p5); NaN cells blank."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(col_labels)), max(3, 0.4 * len(row_labels))))
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
    return _save(fig, path)
