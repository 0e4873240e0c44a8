"""Engine-free decode harness: the sparrow backend's own per-step code over a paged KV cache, no SGLang.

    python bench/decode_harness.py                       # Qwen3-8B attention stack, batch 32, 8K-32K (GPU)
    TRITON_INTERPRET=1 python bench/decode_harness.py --self-test   # toy size on CPU, checked

One decode step as the backend runs it: the step plan (`sglang_patches.decode_plan`: host budgets ->
device table, physical pages), then per layer the landmark kernel for pages that fill and
`sglang_patches.kernel_decode` (dense attention kernel + scoring + top-k + sparse attention, masked by
the plan). Dense = every request without a schedule; sparse = every request under the schedule
(default qwen3-8b-0.86). "graph" captures the layer loop (with the plan's device part) in one CUDA
graph on static buffers and replays it, as SGLang's decode graph runner does; "eager" launches it.

Shapes: Qwen3-8B attention (32 query / 8 KV heads, head dim 128, 36 layers, bf16). To fit one GPU,
the layers share one KV pool and one landmark buffer (each layer still reads its own pass over them,
so the bytes and launches per layer are those of a real stack); MLPs and the rest of the model are not
run: this times attention + selection only. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

P = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--contexts", default="8192,16384,32768")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--schedule", default="qwen3-8b-0.86", help="sparse mode: preset, file or JSON")
    p.add_argument("--graphs", default="both", choices=["eager", "graph", "both"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per point (after 3 warm-up steps)")
    p.add_argument("--self-test", action="store_true", help="toy size on CPU (Triton interpreter), checked")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "decode_harness"))
    return p.parse_args(argv)


class Pool:
    """The duck-typed pools and backend state `kernel_decode` reads (the real ones are SGLang's)."""

    def __init__(self, batch, context, extra, kv_heads, head_dim, layers, dtype, device, seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        max_ctx = context + extra
        pages_per_req = -(-max_ctx // P)
        num_pages = batch * pages_per_req + 1  # page 0: padding
        shape = (num_pages * P, kv_heads, head_dim)
        self.k = torch.randn(shape, generator=gen).to(dtype).to(device)
        self.v = torch.randn(shape, generator=gen).to(dtype).to(device)
        self.marks = torch.zeros(num_pages, kv_heads, head_dim, dtype=dtype, device=device)
        perm = (torch.randperm(num_pages - 1, generator=gen) + 1).reshape(-1)[: batch * pages_per_req]
        pages = perm.reshape(batch, pages_per_req)  # each request's pages, scattered over the pool
        slots = (pages[:, :, None] * P + torch.arange(P)).reshape(batch, -1)
        self.req_to_token = torch.zeros(batch + 1, slots.shape[1], dtype=torch.int32)
        self.req_to_token[1:] = slots.to(torch.int32)
        self.req_to_token = self.req_to_token.to(device)
        self.rpi = torch.arange(1, batch + 1, device=device)
        self.layers = layers
        # every full page's landmark, as prefill would have left it
        from sglang_patches import torch_decode

        all_pages = pages.reshape(-1).to(device)
        torch_decode.write_page_landmarks(self.k, self.marks, all_pages, P)

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


def make_backend(pool: Pool, device) -> SimpleNamespace:
    return SimpleNamespace(
        plan=None, host_plan=None, page_size=P, recorder=None, device=torch.device(device),
        token_to_kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=pool.req_to_token),
    )  # fmt: skip


def layer(layer_id, q_heads, kv_heads, head_dim):
    return SimpleNamespace(
        layer_id=layer_id, tp_q_head_num=q_heads, tp_k_head_num=kv_heads, qk_head_dim=head_dim,
        v_head_dim=head_dim, scaling=head_dim**-0.5,
    )  # fmt: skip


class Step:
    """One decode step of the whole stack, eager or on static buffers (graph)."""

    def __init__(self, args, pool, backend, schedule, context, static: bool):
        from sglang_patches import decode_plan

        self.args, self.pool, self.backend, self.schedule = args, pool, backend, schedule
        self.batch = args.batch
        self.lens = torch.full((self.batch,), context, dtype=torch.int64)
        self.static = static
        device = pool.k.device
        width = pool.req_to_token.shape[1] // P if static else -(-context // P)
        backend.plan = decode_plan.DevicePlan.empty(self.batch, args.layers, width, device)
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.q = torch.randn(args.layers, self.batch, args.q_heads * args.head_dim, generator=gen)
        self.q = self.q.to(pool.k.dtype).to(device)
        self.layers = [layer(i, args.q_heads, args.kv_heads, args.head_dim) for i in range(args.layers)]
        self.fb = SimpleNamespace(req_pool_indices=pool.rpi)
        self.outs = [None] * args.layers

    def host(self):
        """Outside the graph, once per step: schedules + lengths -> the plan table."""
        from sglang_patches import decode_plan

        host = decode_plan.build_host([self.schedule] * self.batch, self.lens.tolist(), self.args.layers)
        self.backend.host_plan = host
        decode_plan.copy_host(self.backend.plan, host)

    def device(self):
        """What the graph records: the plan's device part, then every layer."""
        from sglang_patches import decode_plan
        from sglang_patches.kernel_decode import kernel_decode, write_page_landmarks

        b, pool = self.backend, self.pool
        decode_plan.fill_pages(b.plan, pool.rpi, pool.req_to_token, P)
        for i, lay in enumerate(self.layers):
            write_page_landmarks(pool.k, pool.marks, b.plan.fill_page, P)
            self.outs[i] = kernel_decode(b, self.q[i], lay, self.fb, pool.marks, bounded=not self.static)


def run_point(args, context, schedule, mode, device) -> dict:
    dtype = torch.float32 if args.self_test else torch.bfloat16
    pool = Pool(args.batch, context, 64, args.kv_heads, args.head_dim, args.layers, dtype, device)
    backend = make_backend(pool, device)
    step = Step(args, pool, backend, schedule, context, static=(mode == "graph"))
    cuda = torch.device(device).type == "cuda"
    step.host()
    graph = None
    if mode == "graph" and cuda:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step.device()  # warm-up compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step.device()

    def one():
        step.host()
        if graph is not None:
            graph.replay()
        else:
            step.device()

    for _ in range(3):
        one()
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        one()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    result = {"context": context, "mode": "dense" if schedule is None else "sparse", "graphs": mode,
              "step_ms": 1e3 * times[len(times) // 2]}  # fmt: skip
    if args.self_test:
        result["max_err"] = check(step, pool, schedule)
    return result


def check(step, pool, schedule) -> float:
    """Every layer's output against the torch reference (the rule), on the pool's logical KV."""
    from sparrow_megatron.sparsity.reference import sparse_decode_reference

    args = step.args
    worst = 0.0
    for b in range(step.batch):
        n = int(step.lens[b])
        locs = pool.req_to_token[int(pool.rpi[b]), :n].long()
        keys, values = pool.k[locs], pool.v[locs]
        budget = None if schedule is None else schedule.budget_at(n)
        for i in range(args.layers):
            dense = schedule is None or i in schedule.dense_layers
            q = step.q[i][b].view(1, args.q_heads, args.head_dim)
            ref, _ = sparse_decode_reference(q, [keys], [values], [None if dense else budget],
                                             scale=args.head_dim**-0.5)  # fmt: skip
            got = step.outs[i].view(-1, args.q_heads, args.head_dim)[b]
            worst = max(worst, float((got.float() - ref[0].float()).abs().max()))
    return worst


def markdown(report) -> str:
    lines = [
        f"Decode harness ({report['device']}): {report['layers']} layers, batch {report['batch']}, "
        f"{report['q_heads']} q / {report['kv_heads']} KV heads, head dim {report['head_dim']}, "
        f"sparse = {report['schedule']}. Step = plan + landmarks + attention of every layer (no MLPs).",
        "",
        "| context | graphs | dense step ms | sparse step ms | speedup |",
        "|---|---|---|---|---|",
    ]
    rows = {(r["context"], r["graphs"], r["mode"]): r for r in report["results"]}
    for context in report["contexts"]:
        for mode in report["graph_modes"]:
            d, s = rows.get((context, mode, "dense")), rows.get((context, mode, "sparse"))
            if d and s:
                lines.append(f"| {context} | {mode} | {d['step_ms']:.2f} | {s['step_ms']:.2f} | "
                             f"{d['step_ms'] / s['step_ms']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from sglang_patches.schedules import parse_schedule
    from sparrow_megatron.sparsity.schedule import Schedule

    if args.self_test:
        args.layers, args.batch, args.q_heads, args.kv_heads, args.head_dim, args.steps = 2, 3, 4, 2, 32, 1
        contexts = [200]
        schedule = Schedule(budgets=(64,), dense_layers=(0,), name="self-test-64")
        device = "cpu"
    else:
        contexts = [int(c) for c in args.contexts.split(",")]
        schedule = parse_schedule(args.schedule)
        if not torch.cuda.is_available():
            sys.exit("bench/decode_harness.py needs a CUDA GPU; on CPU run it with --self-test")
        device = "cuda"
    modes = ["eager", "graph"] if args.graphs == "both" else [args.graphs]
    results = []
    for context in contexts:
        for mode in modes:
            for sched in (None, schedule):
                results.append(run_point(args, context, sched, mode, device))
                print(json.dumps(results[-1]), flush=True)
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter)",
        "layers": args.layers, "batch": args.batch, "q_heads": args.q_heads, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "schedule": schedule.name, "contexts": contexts, "graph_modes": modes,
        "results": results,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if args.self_test:
        worst = max(r["max_err"] for r in results)
        if worst > 1e-4:
            print(f"self-test FAILED: max |out - reference| = {worst:.2e}", file=sys.stderr)
            return 1
        print(f"self-test ok: max |out - reference| = {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
