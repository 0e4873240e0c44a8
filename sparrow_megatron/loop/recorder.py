"""Where each step's numbers go, in order of durability: metrics.jsonl, MLflow, the console; and plots.

The loop calls `record(step, metrics)` once per completed step and `schedule_changed` whenever the
schedule in force changes (the first schedule, a controller change). `plots()` redraws the heatmap, the
reward curve and the schedules from the durable record (metrics.jsonl and schedules/), so they are
right after a resume too, and logs them to MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sparrow_megatron.loop.console import REWARD_KEY, LoopProgress
from sparrow_megatron.loop.controller import BudgetChange, schedule_metrics
from sparrow_megatron.loop.monitor import TailMonitor
from sparrow_megatron.loop.rundir import RunDir
from sparrow_megatron.loop.tracking import MlflowTracker
from sparrow_megatron.plots import plot_rewards, plot_schedules, plot_tail_heatmap
from sparrow_megatron.sparsity.schedule import Schedule

log = logging.getLogger(__name__)

EVAL_KEYS = tuple(f"eval/{path}/{m}" for path in ("dense", "sparse") for m in ("mean_at_k", "pass_at_k"))


class StepRecorder:
    def __init__(
        self,
        run_dir: RunDir,
        tracker: MlflowTracker | None = None,
        progress: LoopProgress | None = None,
        monitor: TailMonitor | None = None,
        plot_every: int = 0,
    ):
        self.run_dir = run_dir
        self.tracker = tracker
        self.progress = progress
        self.monitor = monitor
        self.plot_every = plot_every

    def record(self, step: int, metrics: Mapping[str, Any], schedule: Schedule | None = None) -> None:
        """One completed step; `schedule` = the one its rollout ran under, recorded with its metrics."""
        if schedule is not None:
            metrics = {**metrics, **schedule_metrics(schedule)}
        self._store(step, metrics, what=f"step {step}")
        if self.progress is not None:
            self.progress.update(step, metrics)
        if self.plot_every and step % self.plot_every == 0:
            self.plots()

    def record_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """An evaluation of the weights after `step` updates (0: the initial policy); its own row."""
        self._store(step, metrics, what=f"eval after step {step}")
        if self.progress is not None:
            parts = [
                f"{path} mean@k {metrics[f'eval/{path}/mean_at_k']:.3f} pass@k {metrics[f'eval/{path}/pass_at_k']:.3f}"
                for path in ("dense", "sparse")
                if f"eval/{path}/mean_at_k" in metrics
            ]
            self.progress.print(
                f"[cyan]eval[/] after step {step} (k={int(metrics['eval/k'])}): " + ", ".join(parts)
            )

    def _store(self, step: int, metrics: Mapping[str, Any], what: str) -> None:
        self.run_dir.append_metrics(step, metrics)  # first: the durable record survives an MLflow outage
        if self.tracker is not None:
            try:
                self.tracker.log_metrics(step, metrics)
            except Exception as err:  # a tracking hiccup must not kill a training run; the jsonl has it
                log.warning("%s: MLflow logging failed (%s); metrics.jsonl keeps it", what, err)

    def schedule_changed(self, step: int, schedule: Schedule, changes: Sequence[BudgetChange] = ()) -> Path:
        """Save the schedule in force from `step` (and log it); report the controller's changes."""
        path = (
            self.tracker.log_schedule(schedule, step)
            if self.tracker
            else self.run_dir.save_schedule(schedule, step)
        )
        for c in changes:
            message = (
                f"step {c.step}: bin [{c.bin_start}, {c.bin_start + schedule.bin_width}) budget "
                f"{c.old_budget} -> {c.new_budget} ({c.reason})"
            )
            if self.progress is not None:
                self.progress.print(f"[yellow]controller[/] {message}")
        if changes and self.tracker is not None:
            self.tracker.set_tags({"schedule_in_force": f"{schedule.name} (from step {step})"})
        return path

    def plots(self) -> list[Path]:
        """Redraw the run's PNGs from the durable record and log them under `plots/`."""
        out: list[Path] = []
        folder = self.run_dir.plots
        if self.monitor is not None and self.monitor.history:
            steps, starts, matrix = self.monitor.heatmap("p5")
            out.append(
                plot_tail_heatmap(
                    folder / "tail_p5_heatmap.png",
                    steps,
                    starts,
                    matrix,
                    self.monitor.cfg.tau,
                    self.monitor.cfg.bin_width,
                )
            )
        rows = self.run_dir.read_metrics()
        train = [(r["step"], r[REWARD_KEY]) for r in rows if isinstance(r.get(REWARD_KEY), int | float)]
        if train:
            steps = [s for s, _ in train]
            out.append(
                plot_rewards(
                    folder / "reward.png",
                    steps,
                    {REWARD_KEY: [v for _, v in train]},
                    smooth=5 if len(steps) >= 10 else 0,
                )
            )
        evals = [r for r in rows if isinstance(r.get(EVAL_KEYS[0]), int | float)]
        if evals:
            keys = [k for k in EVAL_KEYS if all(isinstance(r.get(k), int | float) for r in evals)]
            out.append(
                plot_rewards(
                    folder / "eval.png",
                    [r["step"] for r in evals],
                    {k.removeprefix("eval/"): [r[k] for r in evals] for k in keys},
                    title="held-out evaluation",
                )
            )
        schedules = {}
        if self.run_dir.schedules.is_dir():
            files = sorted(
                self.run_dir.schedules.glob("step_*.json"), key=lambda p: int(p.stem.split("_")[1])
            )
            for p in files:
                try:
                    schedules[f"from step {p.stem.split('_')[1]}"] = Schedule.load(p)
                except Exception as err:
                    log.warning("%s: skipped in the schedule plot (%s)", p, err)
        if schedules:
            out.append(plot_schedules(folder / "schedules.png", schedules))
        if self.tracker is not None:
            for p in out:
                self.tracker.log_artifact(p, "plots")
        return out
