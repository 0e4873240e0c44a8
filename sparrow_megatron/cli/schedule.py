"""`sparrow schedule show|validate|solve`: inspect, check and compute KV budget schedules."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule, resolve_schedule


def register(subparsers) -> None:
    p = subparsers.add_parser("schedule", help="show, validate or solve KV budget schedules")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    show = sub.add_parser("show", help="print a preset or schedule file (all presets if none given)")
    show.add_argument("schedule", nargs="*", help=f"preset ({', '.join(PRESETS)}) or file")
    show.add_argument("--plot", metavar="PNG", help="draw budget against position")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)

    validate = sub.add_parser("validate", help="check a schedule file; exit 2 naming the problem")
    validate.add_argument("file")
    validate.set_defaults(func=run_validate)

    solve = sub.add_parser("solve", help="cheapest schedule with p5 >= tau from a tail table")
    solve.add_argument("table", help="tail table JSON (candidate budget x bin -> p5)")
    solve.add_argument("--tau", type=float, default=0.86)
    solve.add_argument("--dense-fallback", action="store_true", help="dense in bins no candidate can hold")
    solve.add_argument("--out", help="write the schedule here (.json or .yaml)")
    solve.add_argument("--name", default="solved")
    solve.add_argument("--model", default="qwen3-8b", help="cost model shape for the predicted speedup")
    solve.add_argument("--hardware", default="h200")
    solve.add_argument("--prompt-len", type=int, default=1024)
    solve.add_argument("--gen-len", type=int, default=32768)
    solve.add_argument("--plot", metavar="PNG")
    solve.set_defaults(func=run_solve)


def _table(schedule: Schedule) -> Table:
    t = Table(
        title=f"{schedule.name}  (page {schedule.geometry.page_size}, sink {schedule.geometry.sink_pages}, "
        f"local {schedule.geometry.local_pages}, dense layers {list(schedule.dense_layers)})"
    )
    t.add_column("positions", justify="right")
    t.add_column("budget", justify="right")
    for i, b in enumerate(schedule.budgets):
        last = i == len(schedule.budgets) - 1
        end = "" if last else str((i + 1) * schedule.bin_width)
        t.add_row(f"{i * schedule.bin_width}-{end}", "dense" if b is None else str(b))
    return t


def _resolve(spec: str) -> Schedule:
    schedule = resolve_schedule(spec)
    if schedule is None:
        raise UserError("'dense' has no budgets to show")
    return schedule


def run_show(args) -> int:
    schedules = [_resolve(s) for s in args.schedule] if args.schedule else list(PRESETS.values())
    if args.json:
        print(json.dumps([s.to_dict() for s in schedules], indent=2))
    else:
        console = Console()
        for s in schedules:
            console.print(_table(s))
    if args.plot:
        from sparrow_megatron.plots import plot_schedules

        plot_schedules(args.plot, schedules)
        if not args.json:
            print(f"plot: {args.plot}")
    return 0


def run_validate(args) -> int:
    schedule = Schedule.load(args.file)
    print(f"{args.file}: ok ({schedule.name}, {len(schedule.budgets)} bins of {schedule.bin_width})")
    return 0


def run_solve(args) -> int:
    from sparrow_megatron.sparsity.cost import predict_speedup, resolve_hardware, resolve_model
    from sparrow_megatron.sparsity.solver import TailTable, solve_schedule

    table = TailTable.load(args.table)
    schedule = solve_schedule(table, args.tau, dense_fallback=args.dense_fallback, name=args.name)
    prediction = predict_speedup(
        resolve_model(args.model), resolve_hardware(args.hardware), schedule, args.prompt_len, args.gen_len
    )
    console = Console()
    console.print(_table(schedule))
    console.print(
        f"predicted rollout speedup on {prediction.hardware} for {prediction.model} "
        f"({args.prompt_len} + {args.gen_len} tokens): {prediction.predicted_speedup:.2f}x"
    )
    if args.out:
        schedule.save(args.out)
        console.print(f"schedule: {args.out}")
    if args.plot:
        from sparrow_megatron.plots import plot_schedules

        plot_schedules(args.plot, [schedule])
    return 0
