"""Real jobs on the local two-node Slurm through NeMo-Run's SlurmExecutor: a heterogeneous job whose
groups run concurrently on node1 and node2, and a failing job whose log is retrievable."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from torchx.specs import AppState

from sparrow_megatron.launch import jobs
from sparrow_megatron.launch.spec import LaunchSpec, RolloutGroupConfig, SlurmSettings, TrainerGroupConfig

# free_port: below the ephemeral range. The trainer polls an engine's port before the engine binds it, and a
# poll from an ephemeral port of the same host can connect to itself (TCP self-connect) and hold the port.
from sparrow_megatron.rollout.server import free_port

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

# Each side waits for the other's file: both het groups must be running at the same time.
ROLLOUT = """
set -e
d=$SPARROW_RUN_DIR
env | sort > "$d/rollout.env"
hostname > "$d/rollout.host"
touch "$d/rollout.ready"
for i in $(seq 1 1200); do [ -e "$d/trainer.done" ] && exit 0; sleep 0.1; done
echo "rollout: trainer never finished" >&2; exit 1
"""
TRAINER = """
d=$SPARROW_RUN_DIR
for i in $(seq 1 1200); do [ -e "$d/rollout.ready" ] && break; sleep 0.1; done
[ -e "$d/rollout.ready" ] || { echo "trainer: rollout never started" >&2; exit 1; }
env | sort > "$d/trainer.$RANK.env.tmp" && mv "$d/trainer.$RANK.env.tmp" "$d/trainer.$RANK.env"
if [ "$RANK" = 0 ]; then
  for i in $(seq 1 600); do [ -e "$d/trainer.1.env" ] && break; sleep 0.1; done
  touch "$d/trainer.done"
fi
"""


def small_spec(
    tmp_path: Path, name: str, rollout_cmd: list[str], trainer_cmd: list[str], **trainer
) -> LaunchSpec:
    return LaunchSpec(
        name=name,
        rollout_cmd=rollout_cmd,
        trainer_cmd=trainer_cmd,
        rollout=RolloutGroupConfig(nodes=1, gpus_per_node=2, engine_tp=1),
        # Other processes on a shared machine may hold torchrun's default port.
        trainer=TrainerGroupConfig(nodes=1, gpus_per_node=2, rdzv_port=free_port(), **trainer),
        cluster=SlurmSettings(
            account="sparrow",
            partition="debug",
            time_limit="00:10:00",
            requeue_signal_s=60,
            job_dir=str(tmp_path / "jobs"),
            python=sys.executable,
            env={"SPARROW_TEST_MARK": "local slurm"},
            monitor_interval_s=1,
        ),
        run_dir=str(tmp_path / "run"),
        mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_heterogeneous_job_runs_both_groups_concurrently_and_succeeds(local_slurm, tmp_path):
    spec = small_spec(tmp_path, "hetok", ["bash", "-c", ROLLOUT], ["bash", "-c", TRAINER], tp=2)
    sub = jobs.submit(spec)
    assert sub.sbatch_script is not None and "#SBATCH hetjob" in sub.sbatch_script.read_text()
    final = jobs.wait(sub.experiment_id, spec.cluster.job_dir, timeout_s=300)
    logs = jobs.logs(sub.experiment_id, spec.cluster.job_dir)
    assert [s.state for s in final] == [AppState.SUCCEEDED], "\n".join(logs.values())

    run = tmp_path / "run"
    rollout = read_env(run / "rollout.env")
    trainers = [read_env(run / f"trainer.{rank}.env") for rank in (0, 1)]
    # Rollout group on node1, trainer group on node2, one het job.
    assert rollout["SLURMD_NODENAME"] == "node1"
    assert {t["SLURMD_NODENAME"] for t in trainers} == {"node2"}
    assert rollout["SLURM_JOB_ID"] == trainers[0]["SLURM_JOB_ID"] == final[0].slurm_job_id
    assert rollout["SLURM_HET_SIZE"] == "2"
    assert rollout["SPARROW_ROLE"] == "rollout" and trainers[0]["SPARROW_ROLE"] == "trainer"
    # The env contract: addresses of both groups, ports, parallel layout, MLflow, run dir.
    for env in [rollout, *trainers]:
        assert env["SPARROW_ROLLOUT_HOSTS"] == "node1" and env["SPARROW_TRAINER_HOSTS"] == "node2"
        assert env["SPARROW_ROUTER_URL"] == "http://127.0.0.1:30000"
        assert env["SPARROW_WEIGHT_SYNC_ADDR"] == "127.0.0.1:29600"
        assert env["MLFLOW_TRACKING_URI"] == spec.mlflow_uri
        assert env["SPARROW_RUN_DIR"] == str(run)
        assert env["SPARROW_TEST_MARK"] == "local slurm"
        assert (env["SPARROW_TP"], env["SPARROW_PP"], env["SPARROW_DP"]) == ("2", "1", "1")
        assert env["SPARROW_RESTART_COUNT"] == "0"
        assert env["LD_PRELOAD"].endswith("bind_loopback.so")  # the cluster's TaskProlog ran
    # torchrun over the trainer group: 2 ranks, rendezvous at the trainer head.
    assert sorted(t["RANK"] for t in trainers) == ["0", "1"]
    assert {t["WORLD_SIZE"] for t in trainers} == {"2"}
    assert {t["MASTER_ADDR"] for t in trainers} <= {
        "127.0.0.1",
        "localhost",
        "vm",
        trainers[0]["MASTER_ADDR"],
    }
    assert len(rollout["CUDA_VISIBLE_DEVICES"].split(",")) == 2  # the fake GPUs were allocated
    # A fresh job: no --resume on the trainer command line.
    trainer_log = next(
        text for path, text in logs.items() if "-1_" in path.name and path.name.startswith("log-")
    )
    assert "sparrow task [trainer node 0]" in trainer_log and "--resume" not in trainer_log.split("--")[-1]


def test_failing_job_is_reported_failed_with_its_log(local_slurm, tmp_path):
    spec = small_spec(
        tmp_path,
        "hetfail",
        ["bash", "-c", "sleep 60"],
        ["bash", "-c", "echo sparrow-failure-marker >&2; exit 3"],
        launcher="none",
    )
    sub = jobs.submit(spec)
    final = jobs.wait(sub.experiment_id, spec.cluster.job_dir, timeout_s=300)
    assert [s.state for s in final] == [AppState.FAILED]
    logs = jobs.logs(sub.experiment_id, spec.cluster.job_dir)
    assert any("sparrow-failure-marker" in text for text in logs.values()), list(logs)
    assert any("job exited with code 3" in text for text in logs.values())


RESUMABLE_TRAINER = """
d=$SPARROW_RUN_DIR
case " $* " in
  *" --resume "*) echo "restart=$SPARROW_RESTART_COUNT args=$*" > "$d/resumed"; exit 0 ;;
esac
touch "$d/first_run"
sleep 240
"""


def release_held(slurm_id: str) -> bool:
    """Slurm holds a requeued job back for ~2 minutes (Reason=BeginTime): start it now. True if it was held."""
    reason = subprocess.run(
        ["squeue", "-h", "-j", slurm_id, "-o", "%r"], capture_output=True, text=True, timeout=20
    ).stdout
    if "BeginTime" in reason:
        subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "StartTime=now"], timeout=20, check=False)
    return "BeginTime" in reason


def _requeue_and_wait(sub, spec, run: Path):
    deadline = time.monotonic() + 120
    while not (run / "first_run").exists():
        assert time.monotonic() < deadline, "the first run never started"
        time.sleep(0.5)
    slurm_id = jobs.status(sub.experiment_id, spec.cluster.job_dir)[0].slurm_job_id
    # What Slurm does on preemption of a requeueable job (and what the USR1 trap does near the limit).
    subprocess.run(["scontrol", "requeue", slurm_id], check=True, timeout=20)
    for _ in range(120):
        if release_held(slurm_id):
            break
        time.sleep(0.5)
    final = jobs.wait(sub.experiment_id, spec.cluster.job_dir, timeout_s=300)
    return final, jobs.logs(sub.experiment_id, spec.cluster.job_dir)


def test_requeued_job_resumes_the_trainer_with_resume_flag(local_slurm, tmp_path):
    spec = small_spec(
        tmp_path,
        "hetresume",
        ["bash", "-c", "sleep 240"],
        ["bash", "-c", RESUMABLE_TRAINER, "trainer"],
        launcher="none",
    )
    sub = jobs.submit(spec)
    try:
        final, logs = _requeue_and_wait(sub, spec, tmp_path / "run")
    finally:
        jobs.cancel(sub.experiment_id, spec.cluster.job_dir)  # a failure here must not hold the nodes
    # The states first: the logs after them may be cut short in a CI summary.
    assert [s.state for s in final] == [AppState.SUCCEEDED], f"{final}\n" + "\n".join(logs.values())
    run = tmp_path / "run"
    assert (run / "resumed").read_text().split() == ["restart=1", "args=--resume"]
    # One log per restart: the first run's log is kept.
    names = {p.name for p in logs}
    assert any(n.endswith("_0.out") and n.startswith("log-sparrow.hetresume-1") for n in names)
    assert any(n.endswith("_1.out") and n.startswith("log-sparrow.hetresume-1") for n in names)
