"""Decode-step benchmark of the block top-k kernels at the Qwen3-8B attention shape (issue 5).

    python bench/decode_attention.py                      # full grid, writes JSON + markdown
    python bench/decode_attention.py --batch 8 --context 8192 --budgets 2048   # one point

Per (batch, context): dense time (our paged kernel with every page, and torch SDPA on the gathered
dense KV), sparse time split into scoring / top-k / attention for each budget (512..8192 and the
qwen3-8b-0.86 schedule's budget at that context), the bytes each stage must read and the bandwidth it
achieved, next to a measured device-to-device copy bandwidth (the ceiling), and the sparse/dense speedup
next to the bytes ratio. One layer, one decode step; timings are medians of triton.testing.do_bench
(which flushes L2 between runs). Needs a CUDA GPU; on a CPU-only machine it exits with a message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
from functools import partial
from pathlib import Path

import torch

QWEN3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
DEFAULT_BATCHES = (8, 32, 64)
DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536)
DEFAULT_BUDGETS = (512, 1024, 2048, 4096, 8192)
SCHEDULE = "qwen3-8b-0.86"
TARGETS = (
    "attention kernel >= 80% of copy bandwidth at 32K, batch 32; scoring + top-k <= 15% of the sparse step "
    "at 32K, budget 4096; sparse speedup >= 0.75 x bytes ratio; dense kernel within 1.2x of torch SDPA"
)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    p.add_argument("--context", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    p.add_argument("--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS))
    p.add_argument(
        "--schedule", default=SCHEDULE, help="schedule whose budget_at(context) is added ('' = none)"
    )
    p.add_argument("--shuffle-slots", action="store_true", help="scatter tokens over the pool (fragmented)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default bench/results/decode_attention-<stamp>.json)",
    )
    p.add_argument("--markdown", type=Path, default=None, help="markdown path (default: next to the JSON)")
    return p.parse_args(argv)


def _require_gpu():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit(
            "bench/decode_attention.py: TRITON_INTERPRET is set; unset it, the benchmark times real GPU kernels."
        )
    if not torch.cuda.is_available():
        sys.exit(
            "bench/decode_attention.py needs a CUDA GPU (none visible to torch here); "
            "the kernels' correctness tests run on CPU: pytest tests/kernels"
        )


def _bench(fn, args=None) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))


def copy_bandwidth(args, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes), the practical HBM ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(partial(dst.copy_, src), args)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def bench_point(
    batch: int,
    context: int,
    budgets: list[int],
    args,
    device: str = "cuda",
    shape: dict = QWEN3_8B,
    timer=None,
) -> list[dict]:
    """Rows for one (batch, context); `device`, `shape` and `timer` let the CPU tests drive the plumbing."""
    from sparrow_kernels.decode_attention import paged_decode_attention
    from sparrow_kernels.landmarks import landmark_buffer, update_landmarks
    from sparrow_kernels.page_selection import plan_batch, score_pages, top_k_pages

    hq, hkv, d = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]
    dtype, dev, page = torch.bfloat16, device, 16
    timer = timer or partial(_bench, args=args)
    elt = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(batch * 131 + context)
    slots = batch * context
    k_buffer = torch.randn(slots, hkv, d, dtype=dtype, device=dev, generator=gen)
    v_buffer = torch.randn(slots, hkv, d, dtype=dtype, device=dev, generator=gen)
    order = (
        torch.randperm(slots, device=dev, generator=gen)
        if args.shuffle_slots
        else torch.arange(slots, device=dev)
    )
    req_to_token = order.view(batch, context).to(torch.int32).contiguous()
    req_pool_indices = torch.arange(batch, dtype=torch.int32, device=dev)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q = torch.randn(batch, hq, d, dtype=dtype, device=dev, generator=gen)
    marks = landmark_buffer(batch, context // page, hkv, d, dtype, dev)
    update_landmarks(k_buffer, req_to_token, req_pool_indices, [0] * batch, [context] * batch, marks)

    kv_bytes = 2 * batch * context * hkv * d * elt
    index_bytes = batch * context * 4  # req_to_token entries (read once per KV head program in our kernel)
    paged_args = (q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens)
    dense_ms = timer(partial(paged_decode_attention, *paged_args, max_pages=context // page))

    # SDPA baseline on the gathered dense KV [B, Hkv, L, D] (the gather itself is not timed).
    k_dense = k_buffer[req_to_token.long()].transpose(1, 2).contiguous()
    v_dense = v_buffer[req_to_token.long()].transpose(1, 2).contiguous()
    q4 = q[:, :, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa_ms = timer(partial(sdpa, q4, k_dense, v_dense, enable_gqa=True))
    del k_dense, v_dense

    base = dict(
        batch=batch,
        context=context,
        dense_ms=dense_ms,
        sdpa_ms=sdpa_ms,
        dense_bytes=kv_bytes + index_bytes,
        dense_gbps=_gbps(kv_bytes + index_bytes, dense_ms),
        sdpa_gbps=_gbps(kv_bytes, sdpa_ms),
    )
    rows = []
    for budget in budgets:
        if budget >= context:
            continue
        plan = plan_batch([context] * batch, budget, device=dev)
        scores = score_pages(q, marks, req_pool_indices, plan)
        table, count = top_k_pages(scores, plan)
        score_ms = timer(partial(score_pages, q, marks, req_pool_indices, plan))
        topk_ms = timer(partial(top_k_pages, scores, plan))
        attn_ms = timer(
            partial(paged_decode_attention, *paged_args, table, count, max_pages=plan.max_selected)
        )
        landmark_bytes = batch * plan.max_candidates * hkv * d * elt
        score_out_bytes = batch * hkv * plan.max_candidates * 4
        sel_tokens = plan.max_selected * page
        sparse_kv_bytes = 2 * batch * sel_tokens * hkv * d * elt + batch * hkv * sel_tokens * 4 // page
        sparse_ms = score_ms + topk_ms + attn_ms
        sparse_bytes = landmark_bytes + score_out_bytes + sparse_kv_bytes
        rows.append(dict(
            base, budget=budget, score_ms=score_ms, topk_ms=topk_ms, attention_ms=attn_ms, sparse_ms=sparse_ms,
            score_gbps=_gbps(landmark_bytes, score_ms), topk_gbps=_gbps(score_out_bytes, topk_ms),
            attention_gbps=_gbps(sparse_kv_bytes, attn_ms), sparse_bytes=sparse_bytes,
            selection_share=(score_ms + topk_ms) / sparse_ms, speedup=dense_ms / sparse_ms,
            bytes_ratio=(kv_bytes + index_bytes) / sparse_bytes,
        ))  # fmt: skip
        del scores, table, count
    if not rows:
        rows.append(dict(base, budget=None))
    del k_buffer, v_buffer, marks, paged_args
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return dict(
        device=props.name,
        device_memory_gib=round(props.total_memory / 2**30, 1),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
    )


def markdown(result: dict) -> str:
    env, copy_bw = result["environment"], result["copy_gbps"]
    lines = [
        f"Device: {env['device']} ({env['device_memory_gib']} GiB), torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}, {env['date']}.  ",
        f"Command: `{env['command']}`  ",
        f"Measured device-to-device copy bandwidth: {copy_bw:.0f} GB/s.  ",
        "Qwen3-8B attention (32 q heads, 8 KV heads, head dim 128), bf16, one layer, one decode step; times in ms.",
        "",
        "| batch | context | budget | dense (ours) | SDPA | dense GB/s (% copy) | score | top-k | attention "
        "| attention GB/s (% copy) | sparse | sel. share | speedup | bytes ratio | speedup / bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        dense = f"{r['dense_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['dense_gbps']:.0f} ({100 * r['dense_gbps'] / copy_bw:.0f}%)"
        if r["budget"] is None:
            lines.append(f"| {r['batch']} | {r['context']} | dense | {dense} |" + " - |" * 10)
            continue
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['budget']} | {dense} | {r['score_ms']:.3f} | {r['topk_ms']:.3f} "
            f"| {r['attention_ms']:.3f} | {r['attention_gbps']:.0f} ({100 * r['attention_gbps'] / copy_bw:.0f}%) "
            f"| {r['sparse_ms']:.3f} | {100 * r['selection_share']:.0f}% | {r['speedup']:.2f}x "
            f"| {r['bytes_ratio']:.2f}x | {r['speedup'] / r['bytes_ratio']:.2f} |"
        )
    lines += ["", f"Targets (issue 5): {TARGETS}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parse(argv)
    _require_gpu()
    from sparrow_megatron.sparsity.schedule import resolve_schedule

    schedule = resolve_schedule(args.schedule) if args.schedule else None
    env = _environment()
    copy_bw = copy_bandwidth(args)
    rows = []
    points = [(b, c) for b in args.batch for c in args.context]
    try:
        from rich.progress import track
    except ImportError:  # rich is in the stack; keep the script usable without it
        track = lambda it, **_: it  # noqa: E731
    for batch, context in track(points, description="decode benchmark"):
        budgets = sorted(set(args.budgets) | ({schedule.budget_at(context)} if schedule else set()))
        for row in bench_point(batch, context, budgets, args):
            row["schedule_budget"] = bool(schedule) and row.get("budget") == schedule.budget_at(context)
            rows.append(row)
    result = dict(environment=env, copy_gbps=copy_bw, schedule=args.schedule, targets=TARGETS, rows=rows)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).parent / "results" / f"decode_attention-{stamp}.json"
    md = args.markdown or out.with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md.write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
