"""`sparrow tail FILE.jsonl`: acceptance-rate tails by position from dense and sparse top-K lists."""

from __future__ import annotations

import json
from typing import get_args

from rich.console import Console
from rich.table import Table

from sparrow_megatron.loop.config import TailSignal
from sparrow_megatron.sparsity.tails import DEFAULT_BIN_WIDTH, tail_report
from sparrow_megatron.sparsity.topk_file import acceptance_of, read_topk_jsonl


def register(subparsers) -> None:
    p = subparsers.add_parser("tail", help="acceptance tails by position bin from a top-K JSONL file")
    p.add_argument(
        "file", help="JSONL: {prompt_len, dense: {ids, logprobs}, sparse: {ids, logprobs}} per line"
    )
    p.add_argument("--bin-width", type=int, default=DEFAULT_BIN_WIDTH)
    p.add_argument("--tau", type=float, default=0.86, help="threshold shown in the table and plot")
    p.add_argument(
        "--signal",
        choices=get_args(TailSignal),
        default="lower",
        help="which acceptance the p5 is of: the lower bound (overlap of the two lists only: the reference's "
        "metric, with which tau 0.86 was set), the estimate or the upper bound; the other two are reported too",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="write p5 and mean per bin to this PNG")
    p.set_defaults(func=run)


def run(args) -> int:
    from sparrow_megatron.errors import UserError

    if args.bin_width <= 0:
        raise UserError(f"--bin-width must be positive, got {args.bin_width}")
    estimate, lower, upper, positions = acceptance_of(read_topk_jsonl(args.file))
    chosen = {"lower": lower, "estimate": estimate, "upper": upper}[args.signal]
    report = tail_report(chosen, positions, args.bin_width, lower=lower, upper=upper, tau=args.tau)
    # p5 of the estimate per bin, reported beside the bounds whichever signal the p5 column is of.
    p5_estimate = {b.start: b.p5 for b in tail_report(estimate, positions, args.bin_width, fit=False).bins}
    if args.plot:
        from sparrow_megatron.plots import plot_tails

        plot_tails(args.plot, report, tau=args.tau)
    if args.json:
        keys = ("start", "end", "count", "mean", "p5", "p5_lower", "p5_upper")
        out = {
            "signal": args.signal,
            "bins": [
                {**{k: getattr(b, k) for k in keys}, "p5_estimate": p5_estimate.get(b.start)}
                for b in report.bins
            ],
            "pearson_p5": report.pearson_p5,
            "pearson_mean": report.pearson_mean,
            "tokens": report.tokens,
            "beta": None if report.beta is None else vars(report.beta),
        }
        print(json.dumps(out, indent=2))
        return 0
    table = Table(
        title=f"Acceptance by position ({report.tokens} tokens, tau {args.tau}; * = {args.signal}, "
        "the signal tested)"
    )
    # p1/p10 stay in --json's library report; the table keeps the three p5s in an 80-column terminal.
    signals = ("lower", "estimate", "upper")
    cols = ("bin", "count", "mean", *(f"p5 {x}" + ("*" if x == args.signal else "") for x in signals))
    for col in (*cols, f"< {args.tau}"):
        table.add_column(col, justify="right", no_wrap=True)
    for b in report.bins:
        style = "red" if b.p5 < args.tau else None
        p5s = (b.p5_lower, p5_estimate[b.start], b.p5_upper)
        table.add_row(
            f"{b.start}-{b.end}",
            str(b.count),
            f"{b.mean:.4f}",
            *(f"{x:.3f}" for x in p5s),
            f"{b.frac_below_tau:.2%}",
            style=style,
        )
    console = Console()
    console.print(table)
    fmt = lambda r: "n/a" if r is None else f"{r:+.3f}"  # noqa: E731
    console.print(f"Pearson r vs position: p5 {fmt(report.pearson_p5)}, mean {fmt(report.pearson_mean)}")
    if report.beta:
        console.print(
            f"Beta fit of alpha < 0.999: a={report.beta.a:.3f} b={report.beta.b:.3f} KS={report.beta.ks:.4f}"
        )
    if args.plot:
        console.print(f"plot: {args.plot}")
    return 0
