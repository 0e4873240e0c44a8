"""The GPU benchmark's plumbing on CPU: rows, byte counts and the markdown table (times are fake here)."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "decode_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_only_machine_gets_a_clear_message(bench, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--batch", "8"])


def test_rows_bytes_and_table(bench):
    calls = []

    def run_once(fn):  # runs each timed function once (so the kernels execute), reports 1 ms
        calls.append(fn())
        return 1.0

    shape = dict(num_q_heads=4, num_kv_heads=2, head_dim=64)
    args = bench._parse([])
    rows = bench.bench_point(2, 160, [48, 64, 256], args, device="cpu", shape=shape, timer=run_once)
    assert [r["budget"] for r in rows] == [48, 64]  # 256 >= context: no sparse row
    kv = 2 * 2 * 160 * 2 * 64 * 2
    assert rows[0]["dense_bytes"] == kv + 2 * 160 * 4
    assert rows[1]["sparse_ms"] == 3.0 and rows[1]["speedup"] == pytest.approx(1 / 3)
    assert rows[0]["bytes_ratio"] > rows[1]["bytes_ratio"] > 1  # smaller budget, fewer bytes
    assert torch.isfinite(calls[0]).all()  # the dense kernel's output
    result = dict(
        environment=dict(device="cpu", device_memory_gib=0, torch=torch.__version__, triton="-", cuda=None,
                         date="today", command="python bench/decode_attention.py"),
        copy_gbps=100.0, rows=rows,
    )  # fmt: skip
    table = bench.markdown(result)
    assert table.count("\n| 2 | 160 |") == 2 and "copy bandwidth: 100 GB/s" in table
