"""`sparrow cost`: predicted rollout speedup of a schedule from the eFLOPs cost model."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.cost import (
    HARDWARE,
    MODELS,
    page_size_search,
    predict_speedup,
    resolve_hardware,
    resolve_model,
)
from sparrow_megatron.sparsity.schedule import resolve_schedule


def register(subparsers) -> None:
    p = subparsers.add_parser("cost", help="predicted rollout speedup of a schedule (cost model)")
    p.add_argument("--model", required=True, help=f"{', '.join(MODELS)} or a config.json / model dir")
    p.add_argument("--schedule", required=True, help="preset name or schedule file")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument(
        "--gen-len",
        default="32768",
        help="generation length, a comma list, or a file with one length per line (a distribution)",
    )
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (the prefill is shared)")
    p.add_argument("--batch", type=int, default=64, help="sequences decoded together (weight reads shared)")
    p.add_argument("--hardware", default="h200", help=", ".join(HARDWARE))
    p.add_argument("--page-sizes", action="store_true", help="also show the cost per page size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def parse_lengths(spec: str) -> list[int]:
    path = Path(spec)
    text = path.read_text() if path.is_file() else spec.replace(",", " ")
    try:
        lengths = [int(x) for x in text.split()]
    except ValueError:
        raise UserError(
            f"--gen-len: '{spec}' is not a length, a comma list of lengths, or a file of them"
        ) from None
    if not lengths or min(lengths) < 1:
        raise UserError(f"--gen-len: lengths must be positive integers, got '{spec}'")
    return lengths


def run(args) -> int:
    schedule = resolve_schedule(args.schedule)
    if schedule is None:
        raise UserError("--schedule: 'dense' has nothing to compare against dense")
    model, hardware = resolve_model(args.model), resolve_hardware(args.hardware)
    lengths = parse_lengths(args.gen_len)
    pred = predict_speedup(model, hardware, schedule, args.prompt_len, lengths, args.samples, args.batch)
    result = pred.to_dict()
    if args.page_sizes:
        result["page_sizes"] = page_size_search(
            model, hardware, schedule, args.prompt_len, max(lengths), batch=args.batch
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table(title=f"{model.name} on {hardware.name}, schedule {schedule.name}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row(
        "prompt / generation",
        f"{args.prompt_len} / {', '.join(map(str, lengths[:5]))}" + (" ..." if len(lengths) > 5 else ""),
    )
    table.add_row("samples x batch", f"{args.samples} x {args.batch}")
    table.add_row("dense cost (eFLOPs)", f"{pred.dense_cost:.4g}")
    table.add_row("sparse cost (eFLOPs)", f"{pred.sparse_cost:.4g}")
    table.add_row("predicted speedup", f"{pred.predicted_speedup:.2f}x")
    table.add_row("KV bytes ratio (attention ceiling)", f"{pred.kv_bytes_ratio:.2f}x")
    for row in result.get("page_sizes", []):
        table.add_row(f"page size {row['page_size']}", f"{row['predicted_speedup']:.2f}x")
    Console().print(table)
    return 0
