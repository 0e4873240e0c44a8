"""`sparrow overview`: the published schedules and their predicted rollout speedups, with plots."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparrow_megatron.sparsity.cost import HARDWARE, MODELS, predict_speedup
from sparrow_megatron.sparsity.schedule import PRESETS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "overview", help="predicted speedups of the published Qwen3 schedules, with plots"
    )
    p.add_argument("--out", default="runs/overview", help="directory for speedups.json and the PNG plots")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--gen-len", type=int, default=32768)
    p.add_argument("--samples", type=int, default=8)
    p.set_defaults(func=run)


def run(args) -> int:
    from sparrow_megatron.plots import plot_schedules

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hardware = ["h100", "h200", "b200"]
    table = Table(
        title=f"Predicted rollout speedup, {args.prompt_len} prompt + {args.gen_len} generated, "
        f"{args.samples} samples (cost model)"
    )
    table.add_column("schedule")
    for hw in hardware:
        table.add_column(HARDWARE[hw].name, justify="right")
    table.add_column("KV bytes ratio", justify="right")
    rows = []
    published = {name: s for name, s in PRESETS.items() if name.startswith("qwen3-")}
    for name, schedule in published.items():
        model = MODELS[name.rsplit("-", 1)[0]]
        preds = [
            predict_speedup(model, HARDWARE[hw], schedule, args.prompt_len, args.gen_len, args.samples)
            for hw in hardware
        ]
        rows += [p.to_dict() for p in preds]
        table.add_row(
            name, *[f"{p.predicted_speedup:.2f}x" for p in preds], f"{preds[0].kv_bytes_ratio:.2f}x"
        )
    (out / "speedups.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot = plot_schedules(
        out / "schedules.png", list(PRESETS.values()), max_len=args.gen_len + args.prompt_len
    )
    console = Console()
    console.print(table)
    console.print(f"written: {out / 'speedups.json'}, {plot}")
    return 0
