"""Console progress of the loop (rich): a live bar with the key numbers, one line per step in logs.

On a terminal a progress bar shows step, reward, p5 min (red below tau), rollout tokens/s and the ETA;
when stdout is not a terminal (CI, Slurm logs) each step prints one plain line instead, so the log
keeps the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Metric names the loop logs under (the lead's run() uses these keys).
REWARD_KEY = "reward/mean"
P5_MIN_KEY = "tail/p5_min"
TOKENS_PER_S_KEY = "rollout/tokens_per_s"


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def step_fields(metrics: Mapping[str, Any], tau: float) -> dict[str, str]:
    """The key numbers of one step as display strings (p5 min in red markup when below tau)."""
    p5 = metrics.get(P5_MIN_KEY)
    p5_text = _fmt(p5)
    if p5 is not None and not math.isnan(p5) and p5 < tau:
        p5_text = f"[bold red]{p5_text}[/]"
    return {
        "reward": _fmt(metrics.get(REWARD_KEY)),
        "p5": p5_text,
        "tps": _fmt(metrics.get(TOKENS_PER_S_KEY), ".0f"),
    }


class LoopProgress:
    def __init__(
        self, total_steps: int, start_step: int = 0, tau: float = 0.86, console: Console | None = None
    ):
        self.console = console or Console()
        self.total = total_steps
        self.start_step = start_step
        self.tau = tau
        self.live = self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> LoopProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("reward {task.fields[reward]}"),
                TextColumn("p5 min {task.fields[p5]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.total, completed=self.start_step, reward="-", p5="-", tps="-"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def announce(self, run_dir: Any, checkpoint_step: int | None) -> None:
        """One line saying what this run does: starts fresh, or resumes from which checkpoint."""
        if checkpoint_step is None:
            self.console.print(f"starting {run_dir}: steps 1..{self.total}", highlight=False)
        else:
            self.console.print(
                f"resuming {run_dir} from step {checkpoint_step} (its checkpoint): "
                f"steps {checkpoint_step + 1}..{self.total}",
                highlight=False,
            )

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Step `step` (1-based) is done with these metrics."""
        fields = step_fields(metrics, self.tau)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, **fields)
        else:
            line = f"step {step}/{self.total}  reward {fields['reward']}  p5 min {fields['p5']}"
            self.console.print(f"{line}  {fields['tps']} tok/s", highlight=False)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print above the live bar (warnings, controller changes) without breaking it."""
        self.console.print(*args, **kwargs)
