"""`sparrow train [RECIPE] [key=value ...]`: the Sparrow RL loop (no recipe: the embedded default)."""

from __future__ import annotations

import signal
from pathlib import Path

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
    from sparrow_megatron.loop import spmd
    from sparrow_megatron.loop.console import route_logs
    from sparrow_megatron.loop.default import tiny_cpu
    from sparrow_megatron.loop.run import Loop

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # `sparrow train loop.steps=3`: overrides only
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_config(recipe if recipe is not None else tiny_cpu(), overrides)
    # SIGTERM (Slurm preemption, `kill`) unwinds like Ctrl-C, so the engines we launched are shut down
    # and the last complete checkpoint stays the resume point.
    signal.signal(signal.SIGTERM, _interrupt)
    # Library chatter (Megatron's bucket lists, TE / Apex fallbacks, MLflow) goes to the run's log file only.
    rank = spmd.launch_rank()
    route_logs(Path(cfg.run_dir) / ("train.log" if rank == 0 else f"train.rank{rank}.log"))
    summary = Loop(cfg, resume=args.resume).train()
    print_summary(summary, cfg)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def print_summary(summary, cfg) -> None:
    from sparrow_megatron.loop.recorder import summary_rows

    console = Console()
    table = Table(title=f"Sparrow run: {summary.run_dir}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for quantity, value in summary_rows(summary, cfg.monitor.tau):
        table.add_row(quantity, value)
    table.add_row("MLflow store", summary.mlflow_uri)
    table.add_row("open the UI", summary.ui_command)
    console.print(table)
