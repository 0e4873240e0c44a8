"""bench/rollout_throughput.py end to end at a tiny size: a real SGLang engine, dense and sparse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_run_writes_json_and_table(tmp_path):
    out = tmp_path / "rt"
    cmd = [sys.executable, str(REPO / "bench" / "rollout_throughput.py"), "--layers", "2", "--batch", "2",
           "--context", "200", "--new-tokens", "4", "--budget", "64", "--repeats", "1",
           "--write-model", str(tmp_path / "model"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["batch"], report["context"], report["new_tokens"]) == (2, 200, 4)
    assert report["sparse"] == "flat 64, dense layers [0]"
    for mode in ("dense", "sparse"):
        (run,) = report["results"][mode]["runs"]
        # both requests decode together in the window: at most N tokens each, at least one in all
        assert 1 <= run["tokens"] <= 2 * 4 and run["window_s"] > 0
        assert run["tok_s"] == pytest.approx(run["tokens"] / run["window_s"])
    assert report["speedup"] == pytest.approx(
        report["results"]["sparse"]["tok_s"] / report["results"]["dense"]["tok_s"]
    )
    table = out.with_suffix(".md").read_text()
    assert "| dense | 2 | 200 | 4 |" in table and "| sparse (flat 64, dense layers [0]) |" in table
    assert report["versions"]["sglang"] in table


def test_bad_schedule_fails_before_any_server(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "rollout_throughput.py"), "--schedule", "no-such-preset",
           "--model", str(tmp_path), "--out", str(tmp_path / "x")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "unknown schedule 'no-such-preset'" in done.stderr
