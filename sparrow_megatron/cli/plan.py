"""`sparrow plan RECIPE [key=value ...]`: per-GPU memory of the trainer and the engines against a GPU,
with a verdict per role, and the predicted rollout and step time. Exit code 1 when a role does not fit."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from sparrow_megatron.plan.planner import DEVICE_BYTES


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory and step time of a recipe on a GPU kind")
    p.add_argument("recipe", help="a recipe .py (recipe() -> JobConfig) or a YAML/JSON config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.tp=4")
    p.add_argument("--hardware", default="h100", choices=sorted(DEVICE_BYTES), help="GPU kind [h100]")
    p.add_argument(
        "--layer-spec",
        default="te",
        choices=["te", "local"],
        help="te: Transformer Engine's fused layers (GPU, default); local: Megatron's local spec (CPU)",
    )
    p.add_argument("--json", action="store_true", help="the plan as JSON (keys: docs/memory_plan.md)")
    p.set_defaults(func=run)


def load_job(recipe: str, overrides: list[str]):
    """The job config as `sparrow train` loads it, without requiring the data and model paths to exist."""
    from sparrow_megatron.config import load_config

    return load_config(recipe, overrides, check_paths=False)


def run(args) -> int:
    from sparrow_megatron.plan import make_plan

    plan = make_plan(load_job(args.recipe, list(args.overrides)), args.hardware, args.layer_spec)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
    return 0 if plan.fits else 1


def print_plan(plan) -> None:
    data = plan.to_dict()
    console = Console()
    s = data["settings"]
    console.print(
        f"[bold]{data['job']}[/bold]: {data['model']} on {data['hardware']} ({data['layer_spec']} layers); "
        f"trainer TP {s['tp']} x PP {s['pp']} x CP {s['cp']} x DP {s['dp']}, SP {s['sequence_parallel']}, "
        f"recompute {s['recompute']}, micro-batch {s['micro_batch_tokens']} tokens, "
        f"log-prob chunk {s['logprob_chunk_tokens'] or 'whole micro-batch'}"
    )
    for role in data["roles"]:
        title = f"{role['role']}: {role['verdict']} ({role['total_gib']:.1f} of {role['device_gib']:.1f} GiB)"
        if role["role"] == "trainer":
            title += (
                f", stage {role['stage']} with {role['micro_batches_in_flight']} micro-batch(es) in flight"
            )
        else:
            title += (
                f", {role['engines']} engines of TP {role['engine_tp']}, pool {role['kv_pool_tokens']} "
                f"tokens = {role['full_length_sequences']} full-length sequences"
            )
        table = Table(title=title)
        table.add_column("term")
        table.add_column("GiB per GPU", justify="right")
        for term, gib in role["terms_gib"].items():
            table.add_row(term, f"{gib:.2f}")
        console.print(table)
        if role.get("problem"):
            console.print(f"  [red]{role['problem']}[/red]")
    times = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in data["time_s"].items())
    console.print(f"predicted per step (roofline rollout, trainer at MFU {s['mfu']}): {times}")
