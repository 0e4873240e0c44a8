"""Stopping at a step boundary without losing work: Slurm time limits, preemption notices, `kill`.

A stop is requested by SIGUSR1 or SIGTERM to the driving process, or by the stop file in the run
directory, which the Slurm batch script's USR1 trap writes (`--signal=B:USR1@N`: the batch shell gets the
signal; under torchrun a signal to the step would reach torchrun, which does not forward USR1, so the
file is the path that works for every launcher). The loop finishes the step it is in, commits a
checkpoint, writes the saved marker with that step, and exits with EXIT_REQUEUE. On Slurm the trap's
watcher requeues the job once the marker appears (the batch shell has `scontrol`, a container may not),
and the requeued job's trainer gets `--resume`: it continues at the next step, so no completed step is
lost. A second SIGTERM/SIGUSR1 interrupts at once (the old behaviour: the last checkpoint stays the
resume point).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from sparrow_megatron.launch.contract import SAVED_FILE, STOP_FILE

log = logging.getLogger("sparrow.loop")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: not finished, resume me


class Preempted(SystemExit):
    """Raised at a step boundary after the checkpoint of `step` is committed; exits with EXIT_REQUEUE.

    A SystemExit, so the loop's context managers unwind (engines shut down, the MLflow run marked) and
    the CLI exits with the code, without a traceback."""

    def __init__(self, step: int, reason: str):
        super().__init__(EXIT_REQUEUE)
        self.step = step
        self.reason = reason


class StopRequest:
    """Whether the job was asked to stop; installed (signal handlers) around the loop in rank 0."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, run_root: Path):
        self.stop_file = Path(run_root) / STOP_FILE
        self.saved_file = Path(run_root) / SAVED_FILE
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be set from the main thread (tests may drive the loop from another).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:  # asked twice: stop now
            raise KeyboardInterrupt(f"{name} while stopping at the next step boundary")
        self.reason = name
        log.warning("%s: finishing this step, then checkpoint and stop (again to stop at once)", name)

    def requested(self) -> str | None:
        """The reason to stop at this boundary, or None. The file is checked here only (once a step)."""
        if self.reason is None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        return self.reason

    def stop(self, step: int) -> Preempted:
        """The checkpoint of `step` is committed: tell the batch script, and the exception to raise."""
        tmp = self.saved_file.with_name(self.saved_file.name + ".tmp")
        tmp.write_text(f"{step}\n")
        os.replace(tmp, self.saved_file)
        log.warning(
            "stopped after step %d (%s); checkpoint committed, resume with --resume", step, self.reason
        )
        return Preempted(step, self.reason or "")


class CheckpointClock:
    """Time-based checkpoints (loop.checkpoint_every_s): due when that long has passed since the last
    one (or the start), so a time limit never costs more than about that much work. 0 = off."""

    def __init__(self, every_s: float, clock=time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        return self.every_s > 0 and self.clock() - self.last >= self.every_s

    def saved(self) -> None:
        self.last = self.clock()


class StepBoundary:
    """The loop's decision after each step: checkpoint now? (every `every` steps, the last step, the
    clock, a stop request), and after the checkpoint is committed, stop to be requeued?

        if boundary.checkpoint_due(step):
            save(step)
            boundary.saved(step)  # raises Preempted when a stop was requested
    """

    def __init__(self, stop: StopRequest, last_step: int, every: int, every_s: float, clock=time.monotonic):
        self.stop = stop
        self.last_step = last_step
        self.every = every
        self.clock = CheckpointClock(every_s, clock)
        self.stopping = False

    def checkpoint_due(self, step: int) -> bool:
        # The last step ends the run anyway: a stop request then changes nothing.
        self.stopping = step < self.last_step and self.stop.requested() is not None
        periodic = bool(self.every) and step % self.every == 0
        return periodic or step == self.last_step or self.clock.due() or self.stopping

    def saved(self, step: int) -> None:
        self.clock.saved()
        if self.stopping:
            raise self.stop.stop(step)
