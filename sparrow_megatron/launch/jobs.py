"""Submit, watch, fetch logs of and cancel a `LaunchSpec` job through NeMo-Run's experiment API.

An experiment is addressed by its id (`<name>_<ns>`, printed at submission) and the job dir it lives in.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nemo_run as run
from torchx.specs import AppState

from sparrow_megatron.errors import UserError
from sparrow_megatron.launch.build import add_jobs, new_experiment, use_job_dir
from sparrow_megatron.launch.spec import LaunchSpec

TERMINAL = {AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED}


def _no_stdin(fn):
    """NeMo-Run runs sbatch/sacct/scancel through invoke, which forwards our stdin to them from a thread;
    callers without a readable stdin (pytest, CI, detached shells) make that thread fail. Slurm's
    clients never need it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with open(os.devnull) as devnull, contextlib.ExitStack() as stack:
            saved = sys.stdin
            sys.stdin = devnull
            stack.callback(setattr, sys, "stdin", saved)
            return fn(*args, **kwargs)

    return wrapper


@dataclass
class Submission:
    experiment_id: str
    exp_dir: Path
    # The exact sbatch script (Slurm executor); None for local runs.
    sbatch_script: Path | None
    dry_run: bool


@_no_stdin
def submit(spec: LaunchSpec, *, dry_run: bool = False) -> Submission:
    """Validate and submit (Slurm: returns once sbatch accepted it; local: returns when both processes
    ended). `dry_run` writes the sbatch script and submits nothing."""
    with new_experiment(spec) as exp:
        add_jobs(exp, spec)
        if dry_run:
            exp.dryrun(log=False, delete_exp_dir=False)
        else:
            exp.run(detach=spec.executor == "slurm", sequential=False)
    exp_dir = Path(exp._exp_dir)
    scripts = sorted(exp_dir.glob("*_sbatch.sh"))
    return Submission(
        experiment_id=exp._id,
        exp_dir=exp_dir,
        sbatch_script=scripts[0] if scripts else None,
        dry_run=dry_run,
    )


def _load(experiment_id: str, job_dir: str | Path) -> run.Experiment:
    home = use_job_dir(str(job_dir))
    title = experiment_id.rpartition("_")[0]
    if not title or not (home / "experiments" / title / experiment_id).is_dir():
        known = list_experiments(job_dir)
        hint = f"; known: {', '.join(known[-5:])}" if known else ""
        raise UserError(f"{home}: no experiment '{experiment_id}'{hint}")
    return run.Experiment.from_id(experiment_id)


def list_experiments(job_dir: str | Path) -> list[str]:
    """Experiment ids under the job dir, oldest first."""
    root = Path(str(job_dir)).expanduser() / "experiments"
    dirs = [d for d in root.glob("*/*") if (d / "_CONFIG").exists()] if root.is_dir() else []
    return [d.name for d in sorted(dirs, key=lambda d: d.stat().st_mtime)]


@dataclass
class JobStatus:
    name: str
    state: AppState
    slurm_job_id: str
    local_dir: str


# squeue's states of a job the controller still holds (a requeued one included): not finished.
_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESIZING"}
_ACTIVE = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}


def _still_held(tunnel, slurm_id: str) -> AppState | None:
    """Between a requeued run's end and the next run's record, sacct shows the ended run (FAILED,
    CANCELLED) as the job's state; the controller's queue is the truth for a job it still holds.
    None: the controller no longer holds the job (sacct's state stands). UNKNOWN: the controller did
    not answer, so a terminal sacct state is not trusted until it does."""
    try:
        # --states=all: by default squeue lists only pending, running and completing jobs (or what a
        # user's SQUEUE_STATES says), which leaves out a suspended or requeue-held job.
        res = tunnel.run(f"squeue --states=all -h -j {slurm_id} -o %T", warn=True)
    except Exception:  # the tunnel itself failed (ssh down): the controller's answer is unknown
        return AppState.UNKNOWN
    if res.return_code != 0:
        # A purged job is an invalid id (gone after MinJobAge); anything else is a controller that
        # did not answer (timeouts under load), which must not turn a requeue into a failure.
        return None if "Invalid job id" in (res.stderr or "") else AppState.UNKNOWN
    states = set(res.stdout.split())
    if states & _ACTIVE:
        return AppState.RUNNING
    return AppState.PENDING if states & _QUEUED else None


@_no_stdin
def status(experiment_id: str, job_dir: str | Path) -> list[JobStatus]:
    exp = _load(experiment_id, job_dir)
    info = exp.status(return_dict=True) or {}
    tunnels = {job.id: getattr(job.executor, "tunnel", None) for job in exp.jobs}
    out = []
    for name, d in sorted(info.items()):
        state, slurm_id = d["status"], str(d.get("job_id", ""))
        if state in TERMINAL and slurm_id and tunnels.get(name) is not None:
            state = _still_held(tunnels[name], slurm_id) or state
        out.append(JobStatus(name=name, state=state, slurm_job_id=slurm_id, local_dir=d["local_dir"]))
    return out


def wait(
    experiment_id: str, job_dir: str | Path, *, timeout_s: float, poll_s: float = 2.0
) -> list[JobStatus]:
    """Poll until every job is SUCCEEDED/FAILED/CANCELLED on two polls in a row; raises TimeoutError with
    the last states. Two, because a job being requeued can look finished for a moment (its ended run in
    sacct while the controller rebuilds the job's record); a finished job stays finished."""
    deadline = time.monotonic() + timeout_s
    finished_before = False
    while True:
        states = status(experiment_id, job_dir)
        finished = bool(states) and all(s.state in TERMINAL for s in states)
        if finished and finished_before:
            return states
        finished_before = finished
        if time.monotonic() > deadline:
            raise TimeoutError(f"{experiment_id}: not finished after {timeout_s}s: {states}")
        time.sleep(poll_s)


@_no_stdin
def logs(experiment_id: str, job_dir: str | Path) -> dict[Path, str]:
    """Every log file of the experiment (sbatch output and one per het group and restart), by path."""
    exp = _load(experiment_id, job_dir)
    exp_dir = Path(exp._exp_dir)
    files = sorted({*exp_dir.rglob("log-*.out"), *exp_dir.rglob("log-*.err"), *exp_dir.rglob("sbatch_*.out")})
    # Local runs keep their logs under the job's own dir, named by torchx.
    files += sorted(p for p in exp_dir.rglob("*.log") if p not in files)
    return {p: p.read_text(errors="replace") for p in files if p.is_file()}


@_no_stdin
def cancel(experiment_id: str, job_dir: str | Path) -> list[JobStatus]:
    """Cancel every job of the experiment still running; returns the states afterwards."""
    exp = _load(experiment_id, job_dir)
    for job in exp.jobs:
        exp.cancel(job.id)
    return status(experiment_id, job_dir)
