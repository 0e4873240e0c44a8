"""`jobs.status` asks the controller's queue before it calls a job finished: sacct shows a requeued job's
ended run (FAILED) for a moment before the next run's record appears."""

from __future__ import annotations

from types import SimpleNamespace

from torchx.specs import AppState

from sparrow_megatron.launch.jobs import _still_held


class Tunnel:
    def __init__(self, stdout: str = "", fail: bool = False):
        self.stdout, self.fail, self.commands = stdout, fail, []

    def run(self, command, hide=True, warn=False):
        self.commands.append(command)
        if self.fail:
            raise OSError("ssh: connection refused")
        return SimpleNamespace(stdout=self.stdout)


def test_a_requeued_het_job_still_in_the_queue_is_pending():
    tunnel = Tunnel("PENDING\nPENDING\n")
    assert _still_held(tunnel, "13") == AppState.PENDING
    assert tunnel.commands == ["squeue -h -j 13 -o %T"]


def test_a_running_component_makes_the_job_running():
    assert _still_held(Tunnel("COMPLETING\nRUNNING\n"), "13") == AppState.RUNNING


def test_a_job_the_queue_no_longer_holds_keeps_sacct_state():
    assert _still_held(Tunnel(""), "13") is None  # squeue: Invalid job id (purged)
    assert _still_held(Tunnel("COMPLETED\n"), "13") is None  # kept for MinJobAge, finished
    assert _still_held(Tunnel(fail=True), "13") is None  # unreachable controller
