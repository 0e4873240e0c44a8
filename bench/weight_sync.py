"""Weight sync per mode (http, disk, distributed): seconds and bytes per sync.

    python bench/weight_sync.py                      # CPU: the embedded model, 2 real SGLang engines
    python bench/weight_sync.py --engines 1 --repeats 5
    python bench/weight_sync.py --gpu                # one GPU, no engines: a Qwen3-1.7B-shaped random model

CPU (engines): a fleet of `--engines` CPU engines on the embedded model (sparrow_megatron/assets/
tiny_recall); each mode pushes the model's weights, in `--bucket-mb` buckets, `--repeats` times:
http through /update_weights_from_tensor (one copy per engine), disk as one safetensors snapshot every
engine reloads, distributed as one gloo broadcast per bucket to a group of every engine. Bytes per sync
follow the fleet's definition (`sync/bytes`): the JSON payload summed over engines (http), the snapshot
written once (disk), the bytes broadcast once (distributed: the group's one trainer rank per PP stage).

GPU (`--gpu`, no SGLang needed): the trainer side of each mode on bf16 tensors of Qwen3-1.7B's shapes on
the GPU: http = device->host copy + pickle + base64 of one copy; disk = device->host + safetensors
write; distributed = flattening each bucket on the device + an NCCL broadcast on a world-1 group (one
GPU: the engines' receive and the link bandwidth are not in this number). Writes JSON and a markdown
table (--out, default bench/results/weight_sync.{json,md}).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

MODES = ("http", "disk", "distributed")
# Qwen3-1.7B (config.json): 28 layers, hidden 2048, MLP 6144, 16 query / 8 KV heads of 128, tied vocab.
QWEN3_1P7B = dict(layers=28, hidden=2048, mlp=6144, heads=16, kv_heads=8, head_dim=128, vocab=151936)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--gpu", action="store_true", help="trainer side on one GPU, 1.7B-shaped random weights")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "weight_sync"))
    return p.parse_args(argv)


def qwen3_tensors(shape: dict, device: str, dtype):
    """Random tensors under HF names with a Qwen3 model's shapes (tied embeddings: no lm_head)."""
    import torch

    h, d = shape["hidden"], shape["head_dim"]
    yield "model.embed_tokens.weight", torch.randn(shape["vocab"], h, device=device, dtype=dtype)
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        sizes = {
            "self_attn.q_proj.weight": (shape["heads"] * d, h),
            "self_attn.k_proj.weight": (shape["kv_heads"] * d, h),
            "self_attn.v_proj.weight": (shape["kv_heads"] * d, h),
            "self_attn.o_proj.weight": (h, shape["heads"] * d),
            "self_attn.q_norm.weight": (d,),
            "self_attn.k_norm.weight": (d,),
            "mlp.gate_proj.weight": (shape["mlp"], h),
            "mlp.up_proj.weight": (shape["mlp"], h),
            "mlp.down_proj.weight": (h, shape["mlp"]),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
        for name, size in sizes.items():
            yield p + name, torch.randn(size, device=device, dtype=dtype)
    yield "model.norm.weight", torch.ones(h, device=device, dtype=dtype)


def buckets_of(named, bucket_bytes: int):
    from sparrow_megatron.rollout.weights import rebucket

    return list(rebucket(named, bucket_bytes))


def nbytes(buckets) -> int:
    return sum(t.numel() * t.element_size() for b in buckets for _, t in b)


# ---------------------------------------------------------------- CPU: real engines


def run_cpu(args) -> list[dict]:
    from safetensors.torch import load_file, save_file

    from sparrow_megatron.data.recall import TINY_RECALL_DIR
    from sparrow_megatron.rollout import DistributedGroupSpec, FleetOptions, RolloutConfig, RolloutFleet
    from sparrow_megatron.rollout.server import free_port

    state = sorted(load_file(str(TINY_RECALL_DIR / "model.safetensors")).items())
    buckets = buckets_of(state, args.bucket_mb << 20)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
        rollout = RolloutConfig(engines=args.engines, timeout_s=600)
        options = FleetOptions(model_path=str(TINY_RECALL_DIR), run_dir=f"{tmp}/engines", startup_timeout_s=900,
                               health_interval_s=0)  # fmt: skip
        with RolloutFleet(rollout, options) as fleet:
            for mode in args.modes:
                if mode == "distributed":
                    spec = DistributedGroupSpec("127.0.0.1", free_port(), "bench_sync", backend="gloo")
                    fleet.init_distributed_sync(spec)
                times = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    if mode == "http":
                        fleet.sync_weights(iter(buckets))
                    elif mode == "disk":  # the trainer writes one snapshot, every engine reloads it
                        snap = Path(tmp, f"snap{r}")
                        snap.mkdir()
                        for f in TINY_RECALL_DIR.iterdir():
                            if f.suffix == ".json" or f.name.endswith(".jinja"):
                                (snap / f.name).write_bytes(f.read_bytes())
                        save_file(dict(state), str(snap / "model.safetensors"), metadata={"format": "pt"})
                        fleet.sync_weights_from_disk(snap)
                    else:
                        fleet.sync_weights_distributed(lambda: iter(buckets))
                    times.append(time.perf_counter() - t0)
                rows.append(
                    row(mode, times, fleet.last_sync_bytes, nbytes(buckets), len(buckets), args.engines)
                )
    return rows


# ---------------------------------------------------------------- GPU: trainer side


def run_gpu(args) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/weight_sync.py --gpu needs a CUDA GPU")
    return trainer_side(args, QWEN3_1P7B, "cuda", "nccl")


def trainer_side(args, shape: dict, device: str, backend: str) -> list[dict]:
    """Each mode's trainer-side work on random bf16 weights of `shape` on `device` (tests: cpu/gloo)."""
    import torch

    from sparrow_megatron.rollout.weights import encode_named_tensors, flatten_bucket

    buckets = buckets_of(qwen3_tensors(shape, device, torch.bfloat16), args.bucket_mb << 20)
    raw = nbytes(buckets)
    rows = []
    for mode in args.modes:
        times, sent = [], 0
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            if mode == "http":
                sent = sum(len(encode_named_tensors(b)) for b in buckets)
            elif mode == "disk":
                with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
                    sent = _write_snapshot({n: t.cpu() for b in buckets for n, t in b}, Path(tmp))
            else:
                group = _world1_group(backend, device)
                pending, sent = None, 0
                for b in buckets:  # the loop's pattern: flatten k+1 while k is broadcast
                    flat, _ = flatten_bucket(b)
                    handle = torch.distributed.broadcast(flat, src=0, group=group, async_op=True)
                    if pending is not None:
                        pending[0].wait()
                    pending = (handle, flat)
                    sent += flat.numel()
                pending[0].wait()
                _sync(device)
            times.append(time.perf_counter() - t0)
        rows.append(row(mode, times, sent, raw, len(buckets), 1))
    return rows


def _write_snapshot(state: dict, out: Path) -> int:
    """Bytes written: safetensors as the loop writes it, torch.save where safetensors is not installed."""
    try:
        from safetensors.torch import save_file

        path = out / "model.safetensors"
        save_file(state, str(path))
    except ImportError:
        import torch

        path = out / "model.pt"
        torch.save(state, path)
    return path.stat().st_size


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _world1_group(backend: str, device: str):
    import socket

    import torch

    if not torch.distributed.is_initialized():
        with socket.socket() as sock:  # a free port (rollout.server needs httpx, absent on bare GPU hosts)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0,
            device_id=torch.device("cuda:0") if device == "cuda" else None,
        )  # fmt: skip
    return torch.distributed.group.WORLD


def row(mode: str, times: list[float], sent: int, raw: int, n_buckets: int, engines: int) -> dict:
    return {"mode": mode, "engines": engines, "buckets": n_buckets, "model_bytes": raw, "bytes_per_sync": sent,
            "bytes_per_engine": sent / engines if mode == "http" else sent,
            "median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}  # fmt: skip


def versions() -> dict:
    import torch

    try:
        import sglang

        sgl = sglang.__version__
    except ImportError:
        sgl = "not installed"
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return {
        "sglang": sgl,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "sparrow_git": rev,
    }


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` ({result['date']}, {result['machine']}; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ")",
        "",
        "| mode | engines | buckets | model MB | MB per sync | MB per engine | median s | min s |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['engines']} | {r['buckets']} | {r['model_bytes'] / 1e6:.2f} | "
            f"{r['bytes_per_sync'] / 1e6:.2f} | {r['bytes_per_engine'] / 1e6:.2f} | {r['median_s']:.3f} | "
            f"{r['min_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.gpu:
        import torch

        rows, where = run_gpu(args), torch.cuda.get_device_name(0)
    else:
        rows, where = run_cpu(args), f"{platform.machine()}, {os.cpu_count()} CPU cores"
    result = {
        "command": "python bench/weight_sync.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": where,
        "versions": versions(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
