"""`sparrow calibrate`: measure p5 acceptance over a grid of KV budgets and solve the schedule."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparrow_megatron.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="measure p5 acceptance per (budget, position bin) on real rollouts and solve the schedule",
        description="Sample rollouts under each candidate budget, score the same tokens densely, build the "
        "budget x bin p5 table and solve the cheapest schedule with p5 >= tau. With no --model: the "
        "embedded tiny recall model and its eval prompts (runs on CPU in a few minutes).",
    )
    p.add_argument("--model", metavar="DIR", help="HF checkpoint dir (default: the embedded tiny model)")
    p.add_argument("--prompts", metavar="FILE", help="jsonl/json/parquet: math/code rows or {'prompt': ...}")
    p.add_argument("--tau", type=float, default=0.86)
    p.add_argument("--budgets", metavar="B,B,...", type=_int_list, default=(),
                   help="candidate budgets in tokens (default: multiples of 256 below the longest context)")  # fmt: skip
    p.add_argument("--max-candidates", type=int, default=8, help="cap on the default grid")
    p.add_argument("--bin-width", type=int, help="position bin width (default 256 embedded, else 2000)")
    p.add_argument("--num-prompts", type=int, help="prompts to use (default 4 embedded, else 64)")
    p.add_argument("--samples", type=int, help="samples per prompt and budget (default 2 embedded, else 4)")
    p.add_argument("--max-new-tokens", type=int, help="(default 8 embedded, else 4096)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, help="top-K log-probs per token (default: the whole vocab if <= 256, "
                   "making the acceptance exact, else 20)")  # fmt: skip
    p.add_argument("--min-bin-tokens", type=int, default=20, help="fewer tokens: the cell is not measured")
    p.add_argument("--dense-fallback", action="store_true", help="dense in bins no candidate can hold")
    p.add_argument("--dense-layers", type=_layers, default=(0, 1), metavar="L,L|none",
                   help="layers decoded densely under every candidate (default 0,1; 'none': all sparse)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="calibrated", help="the schedule's name")
    p.add_argument("--out", default="calibration", metavar="DIR", help="output directory")
    p.add_argument("--urls", nargs="+", default=[], metavar="URL", help="attach to running SGLang engines")
    p.add_argument("--kv-pool-tokens", type=int, help="KV pool of the launched engine")
    p.add_argument("--cost-model", help="model shape for the predicted speedup (default: --model's config)")
    p.add_argument("--hardware", default="h200", help="h100 | h200 | b200")
    p.add_argument("--gen-len", type=int, help="generation length for the speedup (default: max-new-tokens)")
    p.set_defaults(func=run)


def _int_list(text: str) -> tuple[int, ...]:
    import argparse

    try:
        values = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected integers like 256,512, got {text!r}")
    return values


def _layers(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("none", ""):
        return ()
    layers = _int_list(text)
    if min(layers) < 0:
        import argparse

        raise argparse.ArgumentTypeError(f"layer ids must be >= 0, got {text!r}")
    return layers


def run(args) -> int:
    from sparrow_megatron.calibration import CalibrateConfig, run_calibration

    cfg = CalibrateConfig(
        model=args.model, prompts=args.prompts, tau=args.tau, budgets=args.budgets,
        max_candidates=args.max_candidates, bin_width=args.bin_width, num_prompts=args.num_prompts,
        samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, min_bin_tokens=args.min_bin_tokens, dense_fallback=args.dense_fallback,
        dense_layers=args.dense_layers,
        seed=args.seed, name=args.name, out=args.out, urls=list(args.urls),
        kv_pool_tokens=args.kv_pool_tokens, cost_model=args.cost_model, hardware=args.hardware,
        gen_len=args.gen_len,
    ).resolved()  # fmt: skip
    # Fail on a bad cost-model argument before minutes of measuring, not after.
    from sparrow_megatron.sparsity.cost import resolve_hardware, resolve_model

    resolve_hardware(args.hardware)
    if args.cost_model:
        resolve_model(args.cost_model)

    console = Console()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as bar:  # fmt: skip
        task = bar.add_task("starting engine", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        result = run_calibration(cfg, progress)

    console.print(_p5_table(result, cfg.tau))
    if result.schedule is not None:
        s = result.schedule
        console.print(
            f"schedule '{s.name}' (bins of {s.bin_width}): "
            + ", ".join("dense" if b is None else str(b) for b in s.budgets)
        )
    p = result.prediction
    if p is not None:
        console.print(
            f"predicted rollout speedup on {p.hardware} for {p.model} ({p.prompt_len} + {p.gen_lens[0]} "
            f"tokens): {p.predicted_speedup:.2f}x (KV bytes ratio {p.kv_bytes_ratio:.2f}x)"
        )
    t = result.timings
    console.print(
        f"engine start {t.get('engine_start_s', 0):.0f} s, measuring {t.get('measure_s', 0):.0f} s, "
        f"total {t.get('total_s', 0):.0f} s"
    )
    for key, path in result.files.items():
        if not key.startswith("topk_"):
            console.print(f"{key}: {path}")
    console.print(f"top-K lists: {result.out_dir / 'topk'} (re-analyse with `sparrow tail`)")
    if result.error:
        raise UserError(result.error)
    return 0


def _p5_table(result, tau: float) -> Table:
    table = result.table
    cols = [j for j in range(table.num_bins) if any(row[j] is not None for row in table.p5)]
    counts = {(c.budget, c.bin): c.count for c in result.cells}
    t = Table(title=f"p5 acceptance, tau {tau}", caption="red: < tau; (tokens)")
    t.add_column("budget", justify="right")
    for j in cols:
        t.add_column(f"{j * table.bin_width}-{(j + 1) * table.bin_width}", justify="right")
    for budget, row in zip(table.budgets, table.p5, strict=True):
        cells = []
        for j in cols:
            v, n = row[j], counts.get((budget, j), 0)
            if v is None:
                cells.append(f"- ({n})")
            else:
                cells.append(f"[red]{v:.3f}[/red] ({n})" if v < tau else f"{v:.3f} ({n})")
        t.add_row(str(budget), *cells)
    return t
