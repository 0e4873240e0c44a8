"""The trainer of the time-limit test on the local Slurm: steps of a fixed length around the loop's own
step boundary (StopRequest, StepBoundary, RunDir: what loop/run.py runs after each step), so the batch
script's USR1 trap, the checkpoint, the requeue and --resume run for real in seconds instead of the
minutes an SGLang engine and Megatron take to start. The real loop's stop is tested in tests/loop.

    python boundary_trainer.py STEPS STEP_SECONDS [--resume]
"""

from __future__ import annotations

import os
import sys
import time

from sparrow_megatron.loop.preempt import StepBoundary, StopRequest
from sparrow_megatron.loop.rundir import RunDir


def main(argv: list[str]) -> None:
    steps, step_s = int(argv[0]), float(argv[1])
    run = RunDir(os.environ["SPARROW_RUN_DIR"]).create()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    start = run.prepare_resume().next_step if "--resume" in argv else 1
    with open(run.root / "starts", "a") as f:
        f.write(f"{restart} {start}\n")
    with StopRequest(run.root) as stop:
        boundary = StepBoundary(stop, steps, every=0, every_s=0)
        for step in range(start, steps + 1):
            time.sleep(step_s)  # the step's work
            run.append_metrics(step, {"restart": restart})
            if boundary.checkpoint_due(step):
                RunDir.write_loop_state(run.begin_checkpoint(step), {"step": step})
                run.commit_checkpoint(step)
                boundary.saved(step)  # exits with EXIT_REQUEUE after a stop request


if __name__ == "__main__":
    main(sys.argv[1:])
