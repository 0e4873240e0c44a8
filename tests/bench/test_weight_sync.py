"""bench/weight_sync.py's trainer-side path (what `--gpu` runs on CUDA/NCCL) on CPU over gloo, tiny shape."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TINY = dict(layers=2, hidden=64, mlp=96, heads=4, kv_heads=2, head_dim=16, vocab=256)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_weight_sync", REPO / "bench" / "weight_sync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trainer_side_counts_one_copy_per_mode_and_broadcasts_every_byte():
    bench = _bench()
    raw = sum(t.numel() * t.element_size() for _, t in bench.qwen3_tensors(TINY, "cpu", torch.bfloat16))
    args = argparse.Namespace(repeats=2, bucket_mb=0, modes=list(bench.MODES))  # 0 MB: a bucket per tensor
    try:
        rows = {r["mode"]: r for r in bench.trainer_side(args, TINY, "cpu", "gloo")}
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert set(rows) == {"http", "disk", "distributed"}
    n_tensors = 1 + TINY["layers"] * 11 + 1
    for r in rows.values():
        assert r["model_bytes"] == raw and r["buckets"] == n_tensors and r["repeats"] == 2
    assert rows["distributed"]["bytes_per_sync"] == raw  # one broadcast of every byte
    assert raw < rows["disk"]["bytes_per_sync"] < raw * 1.1  # the snapshot: tensors + header
    assert raw * 4 / 3 < rows["http"]["bytes_per_sync"] < raw * 4 / 3 * 1.3  # base64 of one pickled copy
    md = bench.markdown(
        {"command": "c", "date": "d", "machine": "m", "versions": {}, "rows": list(rows.values())}
    )
    assert md.count("\n| ") == 4  # header + 3 modes
