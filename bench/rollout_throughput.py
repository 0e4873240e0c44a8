"""Rollout decode throughput of one real SGLang engine (the `sparrow` backend), dense vs sparse, over HTTP.

    python bench/rollout_throughput.py                          # CPU default: random GQA-4 Qwen3, 4 x 12K
    python bench/rollout_throughput.py --model DIR --batch 32 --context 32768 --new-tokens 256 \
        --schedule qwen3-8b-0.86                                # a real checkpoint and a preset

One engine serves both modes (each request names its schedule: "dense", or the sparse one), so dense and
sparse share the process, the prompts and their cached KV. The B prompts (distinct random token ids of
`--context` tokens) are prefilled once; then, per repeat and mode (alternating), the batch asks for
1 + N new tokens with streaming, and each token's arrival is timed. From time(1) of the last request
(every prefill done) to time(1 + N) of the first (none finished yet) all B requests decode in one batch:
decode tok/s = the tokens that arrived in that window / its length. (Timing whole requests instead,
time(1 + N) - time(1), would carry the cached prompts' re-extend, which SGLang's torch_native backend
recomputes over the whole prompt, into both terms: on CPU that noise is larger than the decode.) The
best repeat is reported.

Without --model (or with --write-model DIR) it writes a random-weight Qwen3 with GQA 4: 6 layers, hidden
256, 8 query / 2 KV heads, head dim 64, 32K positions (a character tokenizer; prompts are token ids).
The sparse mode is a preset or file (--schedule) or a flat budget (--budget, --dense-layers).
Writes JSON and a markdown table (--out, default bench/results/rollout_throughput.{json,md}).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

# Measurements of a batch whose requests did not decode together (one finished before another's prefill,
# seen on a loaded machine at tiny sizes) are taken again, this many times in all.
WINDOW_ATTEMPTS = 3

# The CPU benchmark model (the target shape): attention-bound at 12K+ contexts on a CPU.
BENCH_SHAPE = dict(
    vocab_size=128, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: write the random GQA-4 model)")
    p.add_argument(
        "--write-model", default=None, help="where to write the random model (default: a temp dir)"
    )
    p.add_argument("--layers", type=int, default=BENCH_SHAPE["num_hidden_layers"], help="random model layers")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=12288, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=64, help="N: decode steps measured")
    p.add_argument("--schedule", default=None, help="sparse mode: a preset name or schedule file")
    p.add_argument("--budget", type=int, default=1024, help="sparse mode without --schedule: flat budget")
    p.add_argument("--dense-layers", default="0", help="with --budget: comma-separated dense layer ids")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--server-args", default="", help="extra SGLang flags (one shell-quoted string)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rollout_throughput"),
                   help="output path without extension (.json and .md are written)")  # fmt: skip
    p.add_argument("--startup-timeout", type=float, default=900.0)
    return p.parse_args(argv)


def sparse_spec(args) -> tuple[str, str]:
    """(label, the request's sparrow_schedule string) of the sparse mode."""
    from sparrow_megatron.sparsity.schedule import Schedule, resolve_schedule

    if args.schedule:
        resolve_schedule(args.schedule)  # a bad name fails here, not in the server
        return args.schedule, args.schedule
    dense_layers = tuple(int(x) for x in args.dense_layers.split(",") if x.strip())
    schedule = Schedule.fixed(args.budget, dense_layers=dense_layers, name=f"flat-{args.budget}")
    label = f"flat {args.budget}, dense layers {list(dense_layers)}"
    return label, json.dumps(schedule.to_dict())


def write_model(path: Path, layers: int) -> Path:
    from sparrow_megatron.models.tiny import TinyQwen3Shape, make_tiny_qwen3

    shape = TinyQwen3Shape(**{**BENCH_SHAPE, "num_hidden_layers": layers}, tie_word_embeddings=True)
    return make_tiny_qwen3(path, shape)


def post(url: str, payload: dict, timeout: float = 3600.0):
    import httpx

    resp = httpx.post(url + "/generate", json=payload, timeout=timeout)
    if resp.status_code != 200:
        raise RuntimeError(f"/generate answered {resp.status_code}: {resp.text[:500]}")
    return resp.json()


def timed_batch(url: str, prompts: list[list[int]], new_tokens: int, schedule: str) -> float:
    """Seconds for the whole batch (sent at once, one HTTP request per prompt) to generate new_tokens."""
    sampling = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True,
                "custom_params": {"sparrow_schedule": schedule}}  # fmt: skip
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda ids: post(url, {"input_ids": ids, "sampling_params": sampling}), prompts))
    elapsed = time.perf_counter() - start
    for out in outs:
        got = out["meta_info"]["completion_tokens"]
        if got != new_tokens:
            raise RuntimeError(f"asked for {new_tokens} tokens, the engine generated {got}")
    return elapsed


def stream_tokens(url: str, ids: list[int], sampling: dict) -> list[tuple[float, int]]:
    """(arrival time, tokens generated so far) of every streamed chunk of one request."""
    import httpx

    marks = []
    payload = {"input_ids": ids, "sampling_params": sampling, "stream": True}
    with httpx.stream("POST", url + "/generate", json=payload, timeout=3600.0) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"/generate answered {resp.status_code}: {resp.read()[:500]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            marks.append((time.perf_counter(), json.loads(line[5:])["meta_info"]["completion_tokens"]))
    return marks


def decode_window(url: str, prompts: list[list[int]], new_tokens: int, schedule: str) -> dict:
    """The batch's decode rate from streamed arrivals: between the moment every request has its first
    token (time(1) of the last one: all prefills done) and the moment the first request has all 1 + N
    (time(1 + N) of the first one), every request decodes in the same batch; the tokens that arrive in
    that window over its length are the decode tokens/s of batch B."""
    sampling = {"max_new_tokens": 1 + new_tokens, "temperature": 0.0, "ignore_eos": True,
                "custom_params": {"sparrow_schedule": schedule}}  # fmt: skip

    def count_at(marks, moment):
        return max((n for t, n in marks if t <= moment), default=0)

    for _ in range(WINDOW_ATTEMPTS):
        with ThreadPoolExecutor(len(prompts)) as pool:
            streams = list(pool.map(lambda ids: stream_tokens(url, ids, sampling), prompts))
        for marks in streams:
            if marks[-1][1] != 1 + new_tokens:
                raise RuntimeError(f"asked for {1 + new_tokens} tokens, the engine generated {marks[-1][1]}")
        start = max(next(t for t, n in marks if n >= 1) for marks in streams)
        end = min(marks[-1][0] for marks in streams)
        tokens = sum(count_at(m, end) - count_at(m, start) for m in streams)
        if end > start and tokens > 0:
            return {"window_s": end - start, "tokens": tokens, "tok_s": tokens / (end - start)}
    # A request that finished before the last one's prefill: the batch never decoded together.
    raise RuntimeError(f"the {len(prompts)} requests never decoded together in {WINDOW_ATTEMPTS} tries: "
                       "raise --new-tokens")  # fmt: skip


def versions() -> dict:
    import sglang
    import torch

    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return {"sglang": sglang.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "sparrow_git": rev}  # fmt: skip


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def run(args) -> dict:
    from sparrow_megatron.rollout.config import FleetOptions, RolloutConfig
    from sparrow_megatron.rollout.server import ServerProcess, free_port, resolve_device

    label, sparse = sparse_spec(args)
    started = versions()  # the code the engine runs: read before it starts
    scratch = tempfile.TemporaryDirectory(prefix="sparrow_bench_")  # the random model, removed after
    work = Path(scratch.name)
    model = (
        Path(args.model) if args.model else write_model(Path(args.write_model or work / "model"), args.layers)
    )
    per_request = args.context + args.new_tokens + 2
    rollout = RolloutConfig(
        attention_backend="sparrow", server_args=shlex.split(args.server_args),
        # every prompt stays cached (dense and sparse reuse it) with room for the decode of the batch
        kv_pool_tokens=args.batch * (2 * per_request) + 1024,
    )  # fmt: skip
    options = FleetOptions(
        model_path=str(model), device=args.device, context_length=per_request + 64,
        startup_timeout_s=args.startup_timeout, seeded_sampling=False,
    )  # fmt: skip
    device = resolve_device(options)
    port = free_port()
    log = Path(args.out + ".engine.log")  # kept next to the results
    log.parent.mkdir(parents=True, exist_ok=True)
    server = ServerProcess.launch(rollout, options, port, log, str(model))
    try:
        server.wait_healthy(args.startup_timeout)
        rng = random.Random(0)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        # Distinct from the first token on: no prompt shares a cached prefix with another.
        prompts = [[rng.randrange(8, vocab) for _ in range(args.context)] for _ in range(args.batch)]
        prefill_s = timed_batch(server.url, prompts, 1, "dense")  # fills the prefix cache
        # Modes alternate within each repeat, so a change in machine load hits both alike.
        runs: dict[str, list] = {"dense": [], "sparse": []}
        for _ in range(args.repeats):
            for mode, schedule in (("dense", "dense"), ("sparse", sparse)):
                runs[mode].append(decode_window(server.url, prompts, args.new_tokens, schedule))
        results = {mode: {"runs": r, "tok_s": max(x["tok_s"] for x in r)} for mode, r in runs.items()}
    finally:
        server.kill()
        scratch.cleanup()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python bench/rollout_throughput.py " + shlex.join(sys.argv[1:]),
        "versions": started,
        "device": device,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "machine": machine(device),
        "model": str(model) if args.model else f"random Qwen3 {BENCH_SHAPE | {'num_hidden_layers': args.layers}}",
        "batch": args.batch, "context": args.context, "new_tokens": args.new_tokens, "sparse": label,
        "prefill_s": prefill_s, "results": results,
        "speedup": results["sparse"]["tok_s"] / results["dense"]["tok_s"],
    }  # fmt: skip


def markdown(report: dict) -> str:
    r = report["results"]
    lines = [
        f"Rollout decode throughput, {report['date']} on {report['machine']} ({report['device']}); "
        f"SGLang {report['versions']['sglang']}, torch {report['versions']['torch']}, "
        f"sparrow {report['versions']['sparrow_git']}; OMP_NUM_THREADS={report['omp_num_threads']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| mode | batch | context | N | decode window s | tokens in window | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("dense", "sparse"):
        best = max(r[mode]["runs"], key=lambda x: x["tok_s"])
        name = "dense" if mode == "dense" else f"sparse ({report['sparse']})"
        lines.append(
            f"| {name} | {report['batch']} | {report['context']} | {report['new_tokens']} | {best['window_s']:.2f} "
            f"| {best['tokens']} | {r[mode]['tok_s']:.1f} |"
        )
    lines += ["", f"Sparse / dense decode throughput: {report['speedup']:.2f}x (same engine, same run)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
