"""Where each step's numbers go, in order of durability: metrics.jsonl, MLflow, the console; and plots.

The loop calls `record(step, metrics)` once per completed step and `schedule_changed` whenever the
schedule in force changes (the first schedule, a controller change). `plots()` redraws the heatmap, the
reward curve and the schedules from the durable record (metrics.jsonl and schedules/), so they are
right after a resume too, and logs them to MLflow.

metrics.jsonl keeps every number of a row; MLflow gets the constants among them (`PARAM_KEYS`, e.g.
the evaluation's k) as params, since a metric that never changes is a flat chart to scroll past.
"""

from __future__ import annotations

import logging
import re
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

# Per-run constants that some rows carry: params in MLflow, not metrics (eval/n, eval/<set>/prompts).
PARAM_KEYS = re.compile(r"^eval/(n|[^/]+/prompts)$")
_BIN_COUNT = re.compile(r"^tail_bin_(\d+)/count$")
_EVAL_SCORE = re.compile(r"^eval/([^/]+)/(dense|sparse)/(mean|pass)_at_(\d+)$")


def eval_headline_keys(row: Mapping[str, Any]) -> list[str]:
    """The eval keys a chart or a summary shows: mean@n, pass@1 and pass@n of each set and path."""
    n = int(row.get("eval/n", 0))
    keep = []
    for key in row:
        m = _EVAL_SCORE.match(key)
        if m and (m.group(3) == "mean" or int(m.group(4)) in (1, n)):
            keep.append(key)
    return keep


class StepRecorder:
    def __init__(
        self,
        run_dir: RunDir,
        tracker: MlflowTracker | None = None,
        progress: LoopProgress | None = None,
        monitor: TailMonitor | None = None,
        plot_every: int = 0,
        constant_keys: Sequence[str] = (),
    ):
        self.run_dir = run_dir
        self.tracker = tracker
        self.progress = progress
        self.monitor = monitor
        self.plot_every = plot_every
        # Keys this run's config makes constant (a constant learning rate): metrics.jsonl keeps them,
        # MLflow has them as config params already; as a chart a constant is a flat line on an axis
        # padded to +-1 around it, which reads as 0 for a 1e-6 learning rate.
        self.constant_keys = frozenset(constant_keys)

    def record(self, step: int, metrics: Mapping[str, Any], schedule: Schedule | None = None) -> None:
        """One completed step; `schedule` = the one its rollout ran under, recorded with its metrics."""
        if schedule is not None:
            seen = [int(m.group(1)) for m in map(_BIN_COUNT.match, metrics) if m]
            metrics = {**metrics, **schedule_metrics(schedule, seen)}
        self._store(step, metrics, what=f"step {step}")
        if self.progress is not None:
            self.progress.update(step, metrics)
        if self.plot_every and step % self.plot_every == 0:
            self.plots()

    def record_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """An evaluation of the weights after `step` updates (0: the initial policy); its own row."""
        self._store(step, metrics, what=f"eval after step {step}")
        if self.progress is not None:
            for line in eval_lines(step, metrics):
                self.progress.print(line)

    def _store(self, step: int, metrics: Mapping[str, Any], what: str) -> None:
        self.run_dir.append_metrics(step, metrics)  # first: the durable record survives an MLflow outage
        if self.tracker is not None:
            try:
                constants = {k: _param_value(v) for k, v in metrics.items() if PARAM_KEYS.match(k)}
                if constants:
                    self.tracker.log_params(constants)
                skip = self.constant_keys.union(constants)
                self.tracker.log_metrics(step, {k: v for k, v in metrics.items() if k not in skip})
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
        evals = [r for r in rows if "eval/n" in r]
        if evals:
            keys = [
                k
                for k in eval_headline_keys(evals[-1])
                if all(isinstance(r.get(k), int | float) for r in evals)
            ]
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
            self.log_record()
        return out

    def log_record(self) -> None:
        """config.yaml and metrics.jsonl (as of now) as artifacts: the run's own record beside MLflow's."""
        for path in (self.run_dir.config_path, self.run_dir.metrics_path):
            if self.tracker is not None and path.is_file():
                self.tracker.log_artifact(path)


def eval_lines(step: int, metrics: Mapping[str, Any]) -> list[str]:
    """The console's lines for an evaluation: one per set, its paths' mean@n, pass@1 and pass@n."""
    n = int(metrics.get("eval/n", 0))
    sets = dict.fromkeys(m.group(1) for m in map(_EVAL_SCORE.match, metrics) if m)
    lines = []
    for name in sets:
        parts = []
        for path in ("dense", "sparse"):
            key = f"eval/{name}/{path}"
            if f"{key}/mean_at_{n}" not in metrics:
                continue
            ks = sorted({1, n})
            scores = " ".join(f"pass@{k} {metrics[f'{key}/pass_at_{k}']:.3f}" for k in ks)
            parts.append(f"{path} mean@{n} {metrics[f'{key}/mean_at_{n}']:.3f} {scores}")
        prompts = int(metrics.get(f"eval/{name}/prompts", 0))
        lines.append(f"[cyan]eval[/] {name} after step {step} ({prompts} prompts x {n}): " + ", ".join(parts))
    return lines


def _param_value(value: Any) -> Any:
    """4.0 -> 4: counts read as counts on the run page."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def summary_rows(summary: Any, tau: float) -> list[tuple[str, str]]:
    """The end-of-run table (a RunSummary): what the console prints and the MLflow run's description."""
    rows: list[tuple[str, str]] = []
    steps = summary.steps
    if steps:
        first, last = steps[0].metrics, steps[-1].metrics
        rows.append(("reward (first -> last step)", f"{first[REWARD_KEY]:.3f} -> {last[REWARD_KEY]:.3f}"))
        if len(steps) >= 10:  # one step's 4-8 prompts are noisy: the ends of the curve, averaged
            ends = [sum(s.metrics[REWARD_KEY] for s in part) / 5 for part in (steps[:5], steps[-5:])]
            rows.append(("reward (first 5 -> last 5 steps)", f"{ends[0]:.3f} -> {ends[1]:.3f}"))
        for key in sorted(k for k in last if k.startswith("tail_bin_") and k.endswith("/p5")):
            start = int(key[len("tail_bin_") : -len("/p5")])
            rows.append((f"p5 acceptance, bin from {start}", f"{last[key]:.3f} (tau {tau})"))
    if len(summary.evals) >= 2:
        (s0, e0), (s1, e1) = summary.evals[0], summary.evals[-1]
        for key in (k for k in eval_headline_keys(e1) if k in e0):
            name = key.removeprefix("eval/").replace("/", " ").replace("_at_", "@")
            rows.append((f"eval {name} (step {s0} -> {s1})", f"{e0[key]:.3f} -> {e1[key]:.3f}"))
    for key, value in summary.throughput.items():
        rows.append((key.replace("_", " "), f"{value:.3f}" if "reward" in key else f"{value:.1f}"))
    return rows


def summary_markdown(summary: Any, tau: float) -> str:
    """The summary as a Markdown table (MLflow renders a run's description as Markdown)."""
    lines = [f"Sparrow run `{summary.run_dir}`", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(summary, tau)]
    return "\n".join(lines) + "\n"
