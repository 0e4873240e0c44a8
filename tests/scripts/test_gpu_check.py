"""scripts/gpu_check.sh's CPU side: the self-test runs the decode harness, the DistillSparse update bench and
the trainer step at toy size and checks them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_self_test_runs_the_harness_and_writes_the_summary(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--self-test", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=850)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "## decode harness self-test (CPU, Triton interpreter): ok" in summary
    assert "| 200 | eager |" in summary and "| 200 | graph |" in summary
    assert "self-test ok" in summary
    assert "## DistillSparse update self-test (CPU, Triton interpreter): ok" in summary
    assert "distill self-test ok" in summary
    assert "## trainer step self-test (CPU, tiny shape): ok" in summary
    assert "trainer step self-test ok" in summary


def test_harness_refuses_to_time_without_a_gpu():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "decode_harness.py"), "--contexts", "256"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr
