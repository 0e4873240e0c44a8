"""When a loop checkpoint counts: committed (COMPLETE marker, renamed into place) only once every file
of it is on disk, also under trainer.async_save.

A checkpoint directory holds the policy's dist_checkpointing save, the loop state, the DistillSparse
adapter and, under loop.overlap=one_step, the prefetched batch. All but the policy's tensor shards are
written synchronously at the step boundary; with trainer.async_save the shards are written in the
background, and the policy's finalize (its manifest) runs once every trainer rank finished. The step
directory stays `step_N.partial` until then, so a kill before the finalize leaves a directory that
resume ignores: the previous complete checkpoint is used.

    commits.poll()                      every step boundary: cheap, never waits
    commits.wait()                      before the next save, before the export, at the end of the run,
                                        and before a preemption exit (exit 75 means "saved")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sparrow_megatron.loop.preempt import StepBoundary
from sparrow_megatron.loop.rundir import RunDir

log = logging.getLogger("sparrow.loop")


class CheckpointCommits:
    """The loop's checkpoints whose policy save is still in flight, oldest first."""

    def __init__(self, policy, run: RunDir, async_save: bool):
        self.policy = policy  # Policy or spmd.DrivenPolicy: finalize_checkpoints is collective
        self.run = run
        self.async_save = async_save
        self.pending: list[tuple[int, str]] = []  # (step, the policy's checkpoint directory)

    def saved(self, step: int, policy_dir: Path) -> None:
        """Every file of step's checkpoint is written or (async) in flight: commit now or once finalized."""
        if not self.async_save:
            self.run.commit_checkpoint(step)
            return
        self.pending.append((step, str(policy_dir)))

    def poll(self) -> None:
        """Commit the checkpoints whose async save every rank has finished; does not wait."""
        if self.pending:
            self._commit(self.policy.finalize_checkpoints(blocking=False))

    def wait(self) -> None:
        """Wait for every save in flight and commit it."""
        if self.pending:
            self._commit(self.policy.finalize_checkpoints(blocking=True))
            if self.pending:  # the policy finished saves it was not asked for, or lost one
                raise RuntimeError(f"async checkpoint saves not finalized: {self.pending}")

    def _commit(self, finished: list[str]) -> None:
        for policy_dir in finished:
            step, expected = self.pending.pop(0)
            if policy_dir != expected:
                raise RuntimeError(f"async save of {expected} finalized as {policy_dir}: saves out of order")
            self.run.commit_checkpoint(step)
            log.info("checkpoint of step %d committed (async save finalized)", step)


def at_step_boundary(
    step: int, boundary: StepBoundary, commits: CheckpointCommits, save: Callable[[int], Path]
) -> None:
    """After step `step`: commit finished async saves; checkpoint if due (`save(step)` writes it and
    returns the policy's directory); on a stop request the checkpoint is committed before Preempted."""
    commits.poll()
    if not boundary.checkpoint_due(step):
        return
    commits.wait()  # one save in flight at a time
    commits.saved(step, save(step))
    if boundary.stopping:
        commits.wait()  # exit 75 tells the batch script "saved": every byte of it must be on disk
    boundary.saved(step)  # raises Preempted when a stop was requested
