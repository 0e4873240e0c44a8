"""Console of the loop (rich): a live bar with the key numbers, one line per step in logs, and
where log records go.

On a terminal a progress bar shows step, reward, p5 min (red below tau), rollout tokens/s and the ETA;
when stdout is not a terminal (CI, Slurm logs) each step prints one plain line instead, so the log
keeps the numbers. `route_logs` sends every record to the run's log file and only ours (and the
libraries' errors) to the console: Megatron's per-bucket parameter lists, Transformer Engine / Apex
fallback warnings and MLflow's notices are for the file.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
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
            self.print(f"starting {run_dir}: steps 1..{self.total}", highlight=False)
        else:
            self.print(
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
        """Print above the live bar (warnings, controller changes) without breaking it; in a log
        (not a terminal) one event stays one line, not wrapped at the default 80 columns."""
        kwargs.setdefault("soft_wrap", not self.live)
        self.console.print(*args, **kwargs)


# Our loggers (package `sparrow_megatron`, and `sparrow.*`): shown on the console from INFO.
OWN_LOGGERS = ("sparrow_megatron", "sparrow")
# Loggers whose INFO records the console already prints in its own words (the recorder prints each
# controller decision): the file keeps the record, the console shows the event once.
ECHOED_LOGGERS = ("sparrow_megatron.loop.controller",)
FILE_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def for_console(record: logging.LogRecord) -> bool:
    """Whether a record reaches the console (every record reaches the log file)."""
    if record.name.startswith(ECHOED_LOGGERS):
        return record.levelno >= logging.WARNING
    if record.name in OWN_LOGGERS or record.name.startswith(tuple(f"{n}." for n in OWN_LOGGERS)):
        return record.levelno >= logging.INFO
    return record.levelno >= logging.ERROR  # libraries: their errors only; warnings are chatter here


def route_logs(log_file: str | Path | None, stream=None) -> Callable[[], None]:
    """Every record (Python warnings included) to `log_file`, the console's share to `stream`
    (stderr). Returns a function that undoes it (tests). MLflow is told not to install its own
    console handler, so its notices follow the same rule."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    root = logging.getLogger()
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(stream)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    console.addFilter(for_console)
    handlers.append(console)
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(path, encoding="utf-8")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(file)
    previous = (root.level, list(root.handlers), list(warnings.filters))
    for h in previous[1]:
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # Once per call site, as Python shows them, but into the file: "default" instead of the
    # interpreter's "ignore" for DeprecationWarning keeps the file complete without repeats.
    warnings.simplefilter("default")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per rollout request otherwise

    def undo() -> None:
        logging.captureWarnings(False)
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(previous[0])
        for h in previous[1]:
            root.addHandler(h)
        warnings.filters[:] = previous[2]

    return undo
