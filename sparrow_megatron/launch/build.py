"""A `LaunchSpec` as NeMo-Run objects: one heterogeneous Slurm job (rollout group, trainer group) or the
same two commands as local processes."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import nemo_run as run

from sparrow_megatron.launch.contract import SAVED_FILE, STOP_FILE
from sparrow_megatron.launch.spec import LaunchSpec, validate

ROLLOUT, TRAINER = "rollout", "trainer"


def use_job_dir(spec_or_dir: LaunchSpec | str) -> Path:
    """Point NeMo-Run's home at the spec's job dir: experiments, job registry and logs live there."""
    raw = spec_or_dir.cluster.job_dir if isinstance(spec_or_dir, LaunchSpec) else spec_or_dir
    job_dir = Path(os.path.expanduser(raw)).absolute()
    job_dir.mkdir(parents=True, exist_ok=True)
    run.config.set_nemorun_home(str(job_dir))
    # NeMo-Run's Slurm scheduler fixes its job registry path when first imported; a second job dir in
    # the same process (status of another experiment, tests) would read the first dir's registry and
    # see every job of its own as UNKNOWN forever.
    from nemo_run.run.torchx_backend.schedulers import slurm as slurm_scheduler

    slurm_scheduler.SLURM_JOB_DIRS = str(job_dir / ".slurm_jobs")
    return job_dir


def static_env(spec: LaunchSpec) -> dict[str, str]:
    """The contract between the two groups that is known at submit time (both groups get all of it)."""
    r, t = spec.rollout, spec.trainer
    env = {
        "SPARROW_JOB_NAME": spec.name,
        "SPARROW_RUN_DIR": str(Path(os.path.expanduser(spec.run_dir)).absolute()),
        "SPARROW_ROLLOUT_NODES": str(r.nodes),
        "SPARROW_ROLLOUT_GPUS_PER_NODE": str(r.gpus_per_node),
        "SPARROW_ENGINE_TP": str(r.engine_tp),
        "SPARROW_ENGINES_PER_NODE": str(r.engines_on_each_node),
        "SPARROW_ROUTER_PORT": str(r.router_port),
        "SPARROW_ENGINE_BASE_PORT": str(r.engine_base_port),
        "SPARROW_TRAINER_NODES": str(t.nodes),
        "SPARROW_TRAINER_NPROC_PER_NODE": str(t.nproc_per_node),
        "SPARROW_TP": str(t.tp),
        "SPARROW_PP": str(t.pp),
        "SPARROW_DP": str(t.dp),
        "SPARROW_RDZV_PORT": str(t.rdzv_port),
        "SPARROW_WEIGHT_SYNC_PORT": str(spec.weight_sync_port),
    }
    if spec.mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = spec.mlflow_uri
    env.update(spec.cluster.env)
    return env


def local_env(spec: LaunchSpec) -> dict[str, str]:
    """What the sbatch script computes on a cluster, for one machine."""
    env = static_env(spec)
    env.update(
        SPARROW_ROLLOUT_HOSTS="localhost",
        SPARROW_TRAINER_HOSTS="localhost",
        SPARROW_ROLLOUT_ADDRS="127.0.0.1",
        SPARROW_ROLLOUT_HEAD="127.0.0.1",
        SPARROW_TRAINER_HEAD="127.0.0.1",
        SPARROW_ROUTER_URL=f"http://127.0.0.1:{spec.rollout.router_port}",
        SPARROW_WEIGHT_SYNC_ADDR=f"127.0.0.1:{spec.weight_sync_port}",
    )
    return env


def batch_setup_lines(spec: LaunchSpec) -> str:
    """Batch-shell lines (run once, before the sruns): the runtime half of the env contract, and the
    USR1 trap that requeues the job before its time limit so the trainer resumes from a checkpoint."""
    return "\n".join(
        [
            # The trap first: a USR1 that comes before it ends the batch shell (Slurm may signal early).
            'mkdir -p "$SPARROW_RUN_DIR"',
            *requeue_trap_lines(spec.cluster.requeue_signal_s),
            "# sparrow: addresses of the two het groups (NodeAddr, since node names need not resolve)",
            "sparrow_node_addr() {",
            "  timeout 20 scontrol show node \"$1\" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2",
            "}",
            "export SPARROW_ROLLOUT_HOSTS="
            '$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | paste -sd, -)',
            "export SPARROW_TRAINER_HOSTS="
            '$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | paste -sd, -)',
            "# every rollout node's address, in the group's node order: the engines bind there, the",
            "# trainer derives their URLs from it (rollout.urls=env)",
            "SPARROW_ROLLOUT_ADDRS=",
            "for sparrow_h in ${SPARROW_ROLLOUT_HOSTS//,/ }; do",
            '  SPARROW_ROLLOUT_ADDRS="${SPARROW_ROLLOUT_ADDRS:+$SPARROW_ROLLOUT_ADDRS,}$(sparrow_node_addr "$sparrow_h")"',
            "done",
            "export SPARROW_ROLLOUT_ADDRS",
            'export SPARROW_ROLLOUT_HEAD="${SPARROW_ROLLOUT_ADDRS%%,*}"',
            'export SPARROW_TRAINER_HEAD=$(sparrow_node_addr "${SPARROW_TRAINER_HOSTS%%,*}")',
            'export SPARROW_ROUTER_URL="http://${SPARROW_ROLLOUT_HEAD}:${SPARROW_ROUTER_PORT}"',
            'export SPARROW_WEIGHT_SYNC_ADDR="${SPARROW_TRAINER_HEAD}:${SPARROW_WEIGHT_SYNC_PORT}"',
            'export SPARROW_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"',
        ]
    )


def requeue_trap_lines(signal_s: int) -> list[str]:
    """Near the time limit (USR1, `--signal=B:USR1@signal_s`) ask the trainer to stop: it finishes its
    step, commits a checkpoint and writes the saved marker; then requeue (the requeued trainer gets
    --resume). If no marker comes before the limit is close, requeue anyway: the last checkpoint is the
    resume point. The batch shell requeues, since a container may have no scontrol. The bash `wait`/
    `sleep` of the job's monitor loop ends before the trap runs, so it runs within ~10 s."""
    grace = max(signal_s - min(60, signal_s // 4), 1)
    stop, saved = f'"$SPARROW_RUN_DIR/{STOP_FILE}"', f'"$SPARROW_RUN_DIR/{SAVED_FILE}"'
    return [
        "# sparrow: near the time limit, checkpoint at the next step boundary, then requeue",
        f"rm -f {stop} {saved}",
        "sparrow_requeue() {",
        '  echo "sparrow: USR1 at $(date): the trainer checkpoints after its step, then job $SLURM_JOB_ID is requeued"',
        f"  touch {stop}",
        f"  ( for _ in $(seq 1 {grace * 5}); do [ -e {saved} ] && break; sleep 0.2; done",
        # No marker and the batch shell gone: the trainer finished the run (a stop in its last step is
        # no stop), nothing to requeue. Slurm requeues a finished job too, so a marker always counts.
        f"    [ -e {saved} ] || kill -0 $$ 2>/dev/null || exit 0",
        f'    echo "sparrow: requeueing job $SLURM_JOB_ID (trainer saved step: $(cat {saved} 2>/dev/null || echo none))"',
        '    timeout 30 scontrol requeue "$SLURM_JOB_ID" ) &',
        "}",
        "trap sparrow_requeue USR1",
    ]


def _task_args(spec: LaunchSpec, role: str) -> list[str]:
    t = spec.trainer
    if role == ROLLOUT:
        return [ROLLOUT, "--", *spec.resolved_rollout_cmd()]
    return [
        TRAINER,
        f"--launcher={t.launcher}",
        f"--nnodes={t.nodes}",
        f"--nproc-per-node={t.nproc_per_node}",
        f"--rdzv-port={t.rdzv_port}",
        f"--resume-flag={spec.resume_flag}",
        "--",
        *spec.resolved_trainer_cmd(),
    ]


def task(spec: LaunchSpec, role: str, *, quote: bool) -> run.Script:
    """The group's command, through the node-side wrapper. NeMo-Run joins Slurm command args with
    spaces and no quoting, so they are shell-quoted here; local processes get argv as is."""
    args = _task_args(spec, role)
    if quote:
        args = [shlex.quote(a) for a in args]
    return run.Script(path="sparrow_megatron.launch.task", m=True, entrypoint=spec.cluster.python, args=args)


def slurm_executors(spec: LaunchSpec) -> list[run.SlurmExecutor]:
    """Two het components: [rollout, trainer]. The first carries the job-wide settings."""
    c = spec.cluster
    env = {k: shlex.quote(v) for k, v in static_env(spec).items()}  # NeMo-Run writes `export K=v` raw
    executors = []
    for role, nodes, gpus in [
        (ROLLOUT, spec.rollout.nodes, spec.rollout.gpus_per_node),
        (TRAINER, spec.trainer.nodes, spec.trainer.gpus_per_node),
    ]:
        executors.append(
            run.SlurmExecutor(
                account=c.account,
                partition=c.partition,
                job_name_prefix="sparrow.",
                time=c.time_limit,
                nodes=nodes,
                # One task per node: the wrapper starts the node's engines or its torchrun.
                ntasks_per_node=1,
                gpus_per_node=gpus or None,
                container_image=c.container_image,
                container_mounts=list(c.container_mounts),
                # The first component's env is exported job-wide in the batch script; srun passes it on.
                env_vars=dict(env) if role == ROLLOUT else {},
                heterogeneous=True,
                tunnel=run.LocalTunnel(job_dir=""),
                packager=run.Packager(),
                retries=c.max_retries,
                signal=f"B:USR1@{c.requeue_signal_s}" if c.requeue_signal_s else None,
                additional_parameters={"requeue": True},
                setup_lines=batch_setup_lines(spec) if role == ROLLOUT else None,
                wait_time_for_group_job=c.group_start_delay_s,
                monitor_group_job_wait_time=c.monitor_interval_s,
                poll_estimated_start_time=False,
            )
        )
    return executors


def local_executor(spec: LaunchSpec) -> run.LocalExecutor:
    return run.LocalExecutor(env_vars=local_env(spec))


def new_experiment(spec: LaunchSpec) -> run.Experiment:
    """A NeMo-Run experiment for the spec, under the job dir; enter it (`with`) and `add_jobs`."""
    validate(spec)
    use_job_dir(spec)
    return run.Experiment(spec.name, log_level="WARN", clean_mode=True)


def add_jobs(exp: run.Experiment, spec: LaunchSpec) -> None:
    """The spec's job: one het Slurm job, or two local processes (rollout, trainer)."""
    if spec.executor == "slurm":
        exp.add(
            [task(spec, ROLLOUT, quote=True), task(spec, TRAINER, quote=True)],
            executor=slurm_executors(spec),
            name=spec.name,
        )
    else:
        exp.add(
            task(spec, ROLLOUT, quote=False), executor=local_executor(spec), name=f"{spec.name}-{ROLLOUT}"
        )
        exp.add(
            task(spec, TRAINER, quote=False), executor=local_executor(spec), name=f"{spec.name}-{TRAINER}"
        )
