"""A job that reaches its Slurm time limit: Slurm sends USR1 before the limit (`--signal=B:USR1@N`), the
batch script's trap asks the trainer to stop, the trainer checkpoints the step in flight and exits, the
trap requeues the job, and the requeued trainer resumes with --resume after the saved step: every
completed step is recorded exactly once (none lost, none redone)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from torchx.specs import AppState

from sparrow_megatron.launch import jobs
from tests.launch.test_jobs import release_held, small_spec

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]
TRAINER = Path(__file__).with_name("boundary_trainer.py")
REPO = Path(__file__).resolve().parents[2]


def test_time_limit_checkpoints_the_step_in_flight_requeues_and_resumes(local_slurm, tmp_path):
    steps = 24
    spec = small_spec(
        tmp_path,
        "timelimit",
        ["bash", "-c", "sleep 600"],
        [sys.executable, str(TRAINER), str(steps), "5"],
        launcher="none",
    )
    # The shortest limit the spec allows with USR1 30 s before it (Slurm may signal up to a minute early,
    # so 30-90 s into each run): 120 s of steps outlast the first run's signal; later runs do at least
    # about 6 steps each.
    spec.cluster.time_limit = "00:02:00"
    spec.cluster.requeue_signal_s = 30
    spec.cluster.env["PYTHONPATH"] = str(REPO)
    sub = jobs.submit(spec)
    deadline = time.monotonic() + 540
    while True:
        slurm_id = jobs.status(sub.experiment_id, spec.cluster.job_dir)[0].slurm_job_id
        if slurm_id:
            release_held(slurm_id)
        try:  # jobs.wait's own rule for "finished" (a requeue can look finished for a moment)
            status = jobs.wait(sub.experiment_id, spec.cluster.job_dir, timeout_s=4)
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "the job did not finish"
    logs = jobs.logs(sub.experiment_id, spec.cluster.job_dir)
    everything = "\n".join(f"==> {p} <==\n{t[-3000:]}" for p, t in logs.items())
    assert status[0].state == AppState.SUCCEEDED, everything

    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), everything  # each step once
    assert not list(run.glob("metrics.jsonl.dropped-*")), "a completed step was lost and redone"
    starts = [tuple(map(int, line.split())) for line in (run / "starts").read_text().splitlines()]
    assert len(starts) >= 2 and starts[0] == (0, 1), starts  # the limit was hit at least once
    # Each requeued run started right after the step its predecessor saved on the way out.
    for (_, begin), (restart, after) in zip(starts, starts[1:], strict=False):
        assert restart >= 1 and after > begin
        assert (run / "checkpoints" / f"step_{after - 1}").is_dir()
    assert any("sparrow: USR1 at" in t for t in logs.values()), everything
    assert any("trainer saved step:" in t for t in logs.values()), everything
