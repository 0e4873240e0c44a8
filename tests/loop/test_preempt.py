"""Stopping at a step boundary: signals and the stop file request it, the boundary checkpoints the step
in flight and then stops with EXIT_REQUEUE; time-based checkpoints."""

from __future__ import annotations

import os
import signal

import pytest

from sparrow_megatron.launch.contract import SAVED_FILE, STOP_FILE
from sparrow_megatron.loop.preempt import EXIT_REQUEUE, Preempted, StepBoundary, StopRequest


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_requests_a_stop_and_a_second_one_interrupts(sig, tmp_path):
    before = signal.getsignal(sig)
    with StopRequest(tmp_path) as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), sig)
        assert stop.requested() == signal.Signals(sig).name
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before  # restored after the loop


def test_the_stop_file_stops_after_the_step_in_flight_is_saved(tmp_path):
    clock = FakeClock()
    boundary = StepBoundary(StopRequest(tmp_path), last_step=10, every=4, every_s=0, clock=clock)
    saved = []
    with pytest.raises(Preempted) as stopped:
        for step in range(1, 11):
            if step == 6:  # the batch script's USR1 trap, while step 6 runs
                (tmp_path / STOP_FILE).touch()
            if boundary.checkpoint_due(step):
                saved.append(step)
                boundary.saved(step)
    assert saved == [4, 6]  # the periodic one, then the step in flight: nothing completed is lost
    assert stopped.value.code == EXIT_REQUEUE and stopped.value.step == 6
    assert (tmp_path / SAVED_FILE).read_text() == "6\n"  # what the trap's watcher waits for


def test_a_stop_requested_during_the_last_step_just_finishes(tmp_path):
    boundary = StepBoundary(StopRequest(tmp_path), last_step=3, every=0, every_s=0)
    (tmp_path / STOP_FILE).touch()
    assert [s for s in (3,) if boundary.checkpoint_due(s)] == [3]
    boundary.saved(3)  # no Preempted: the run is complete
    assert not (tmp_path / SAVED_FILE).exists()


def test_time_based_checkpoints_count_from_the_last_save(tmp_path):
    clock = FakeClock()
    boundary = StepBoundary(StopRequest(tmp_path), last_step=100, every=0, every_s=60, clock=clock)
    saved = []
    for step in range(1, 8):
        clock.now += 25  # each step takes 25 s
        if boundary.checkpoint_due(step):
            saved.append(step)
            boundary.saved(step)
    assert saved == [3, 6]  # 75 s, then 75 s after that save
    off = StepBoundary(StopRequest(tmp_path), last_step=100, every=0, every_s=0, clock=clock)
    clock.now += 1e6
    assert not off.checkpoint_due(1)
