"""`sparrow train [RECIPE] [key=value ...]`: the Sparrow RL loop (no recipe: the embedded default)."""

from __future__ import annotations

import logging
import signal

from rich.console import Console
from rich.table import Table


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="run the RL loop (no recipe: the embedded tiny CPU default)")
    p.add_argument("recipe", nargs="?", help="a recipe .py (recipe() -> JobConfig) or a YAML/JSON config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. loop.steps=5")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in loop.run_dir from its last checkpoint"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from sparrow_megatron.config import load_config
    from sparrow_megatron.loop.default import tiny_cpu
    from sparrow_megatron.loop.run import Loop

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # `sparrow train loop.steps=3`: overrides only
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_config(recipe if recipe is not None else tiny_cpu(), overrides)
    # SIGTERM (Slurm preemption, `kill`) unwinds like Ctrl-C, so the engines we launched are shut down
    # and the last complete checkpoint stays the resume point.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per rollout request otherwise
    summary = Loop(cfg, resume=args.resume).train()
    print_summary(summary, cfg)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def print_summary(summary, cfg) -> None:
    console = Console()
    steps = summary.steps
    table = Table(title=f"Sparrow run: {summary.run_dir}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    if steps:
        first, last = steps[0].metrics, steps[-1].metrics
        table.add_row(
            "reward (first -> last step)", f"{first['reward/mean']:.3f} -> {last['reward/mean']:.3f}"
        )
        if len(steps) >= 10:  # one step's 4-8 prompts are noisy: the ends of the curve, averaged
            ends = [sum(s.metrics["reward/mean"] for s in part) / 5 for part in (steps[:5], steps[-5:])]
            table.add_row("reward (first 5 -> last 5 steps)", f"{ends[0]:.3f} -> {ends[1]:.3f}")
        for key in sorted(k for k in last if k.startswith("tail/p5/")):
            table.add_row(f"p5 acceptance {key.split('/')[-1]}", f"{last[key]:.3f} (tau {cfg.monitor.tau})")
    if len(summary.evals) >= 2:
        (s0, e0), (s1, e1) = summary.evals[0], summary.evals[-1]
        for key in (k for k in e1 if k.endswith(("mean_at_k", "pass_at_k")) and k in e0):
            name = key.removeprefix("eval/").replace("/", " ").replace("_at_k", "@k")
            table.add_row(f"eval {name} (step {s0} -> {s1})", f"{e0[key]:.3f} -> {e1[key]:.3f}")
    for key, value in summary.throughput.items():
        table.add_row(key.replace("_", " "), f"{value:.3f}" if "reward" in key else f"{value:.1f}")
    table.add_row("MLflow store", summary.mlflow_uri)
    table.add_row("open the UI", summary.ui_command)
    console.print(table)
