"""`jobs.status` asks the controller's queue before it calls a job finished: sacct shows a requeued job's
ended run (FAILED) for a moment before the next run's record appears."""

from __future__ import annotations

from types import SimpleNamespace

from torchx.specs import AppState

from sparrow_megatron.launch import jobs
from sparrow_megatron.launch.jobs import JobStatus, _still_held


class Tunnel:
    def __init__(self, stdout: str = "", fail: bool = False, rc: int = 0, stderr: str = ""):
        self.stdout, self.fail, self.rc, self.stderr, self.commands = stdout, fail, rc, stderr, []

    def run(self, command, hide=True, warn=False):
        self.commands.append(command)
        if self.fail:
            raise OSError("ssh: connection refused")
        return SimpleNamespace(stdout=self.stdout, stderr=self.stderr, return_code=self.rc)


def test_a_requeued_het_job_still_in_the_queue_is_pending():
    tunnel = Tunnel("PENDING\nPENDING\n")
    assert _still_held(tunnel, "13") == AppState.PENDING
    assert tunnel.commands == ["squeue --states=all -h -j 13 -o %T"]


def test_a_running_component_makes_the_job_running():
    assert _still_held(Tunnel("COMPLETING\nRUNNING\n"), "13") == AppState.RUNNING


def test_a_job_the_queue_no_longer_holds_keeps_sacct_state():
    assert _still_held(Tunnel(""), "13") is None
    assert _still_held(Tunnel("COMPLETED\nCOMPLETED\n"), "13") is None  # kept for MinJobAge, finished
    purged = Tunnel(rc=1, stderr="slurm_load_jobs error: Invalid job id specified")
    assert _still_held(purged, "13") is None


def test_a_controller_that_does_not_answer_leaves_the_state_unknown():
    """A transient sacct FAILED must not end `jobs.wait` while squeue times out under load."""
    timed_out = Tunnel(rc=1, stderr="slurm_load_jobs error: Socket timed out on send/recv operation")
    assert _still_held(timed_out, "13") == AppState.UNKNOWN
    assert _still_held(Tunnel(fail=True), "13") == AppState.UNKNOWN


def test_wait_does_not_end_on_a_finished_state_seen_once(monkeypatch):
    """A requeue can show FAILED for one poll; `wait` returns only a state two polls agree on."""
    polls = iter(
        [AppState.RUNNING, AppState.FAILED, AppState.PENDING, AppState.RUNNING] + [AppState.SUCCEEDED] * 3
    )
    calls = []

    def status(experiment_id, job_dir):
        calls.append(1)
        return [JobStatus(name="job", state=next(polls), slurm_job_id="13", local_dir="/x")]

    monkeypatch.setattr(jobs, "status", status)
    final = jobs.wait("exp_1", "/jobs", timeout_s=60, poll_s=0)
    assert [s.state for s in final] == [AppState.SUCCEEDED] and len(calls) == 6
