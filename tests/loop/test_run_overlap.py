"""loop.overlap=one_step end to end on the embedded default (a real SGLang engine, Megatron, MLflow),
with a dense schedule so the tails measure nothing but the reference's weights: batch n+1 is generated
during step n from the weights of update n-1, its dense reference is scored on the engine at those same
weights, so the tails stay at 1.0 despite the one-step policy lag. A run stopped by SIGUSR1 (what a
Slurm time limit sends) checkpoints the step in flight with the prefetched batch, exits 75, and its
--resume reproduces the uninterrupted overlapped run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from sparrow_megatron.loop.preempt import EXIT_REQUEUE
from tests.loop.test_run import SMALL, SPARROW, _deterministic, _env, _metrics

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

OVERLAP = [
    *(a for a in SMALL if not a.startswith(("loop.eval", "loop.checkpoint_every"))),
    "loop.overlap=one_step",
    "rollout.schedule=dense",
    "monitor.controller.enabled=false",  # it adjusts sparse schedules only
    "loop.checkpoint_every=0",  # only the stop's and the final checkpoint
]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [*SPARROW, *OVERLAP, f"loop.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def overlapped_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("overlap") / "reference"
    proc = subprocess.run(_cmd(run_dir), env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir


def test_one_step_lag_is_recorded_and_the_dense_tails_stay_at_one(overlapped_run):
    rows = _metrics(overlapped_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Batch n (n >= 2) comes from the weights of update n-2; the engines report the same version.
    assert [r["rollout/batch_weight_version"] for r in rows] == [0, 0, 1]
    assert [r["rollout/engine_weight_version"] for r in rows] == [0, 0, 1]
    assert [r["rollout/policy_lag"] for r in rows] == [0, 1, 1]
    assert [r["rollout/weight_version"] for r in rows] == [1, 2, 3]  # one sync per step
    for r in rows:
        # Dense sampling against the engine's dense teacher-forced scores at the sampling weights: the
        # lagged policy does not show (prefill vs decode arithmetic leaves the last bits).
        assert r["tail_bin_01024/count"] == r["train/num_tokens"] > 0
        assert r["tail_bin_01024/p5"] >= 0.99 and r["tail_bin_01024/p5_lower"] >= 0.99
        assert 0.0 <= r["time/overlap_frac"] <= 1.0 and r["time/rollout_generate_s"] > 0
    assert rows[-1]["time/overlap_frac"] == 0.0  # nothing is generated past the last step


def test_a_stopped_overlapped_run_resumes_to_the_same_numbers(overlapped_run, tmp_path):
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        _cmd(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 900
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "step 1 never completed"
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)  # during step 2: it finishes, checkpoints, stops
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_REQUEUE, err[-5000:]
    saved = int((run_dir / ".sparrow_saved").read_text())
    assert saved == 2 and [r["step"] for r in _metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "step_2" / "next_batch.pt").is_file()  # batch 3, from update 1

    resumed = subprocess.run(
        _cmd(run_dir, "--resume"), env=_env(), capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for got, want in zip(rows, _metrics(overlapped_run), strict=True):
        got, want, step = _deterministic(got), _deterministic(want), got["step"]
        tails = [k for k in want if k.startswith(("tail/", "tail_bin_"))]
        assert {k: got.pop(k) for k in tails} == pytest.approx({k: want.pop(k) for k in tails}, abs=1e-4), (
            step
        )
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), step
