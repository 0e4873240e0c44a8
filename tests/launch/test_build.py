"""The dry-run sbatch script of a 14B-sized spec (no Slurm needed): node counts, GPUs, het groups,
srun --het-group lines, torchrun/SGLang arguments, env, requeue; and the same spec run locally."""

from __future__ import annotations

import re
import sys

from sparrow_megatron.launch import jobs
from sparrow_megatron.launch.spec import (
    DEFAULT_IMAGE,
    LaunchSpec,
    RolloutGroupConfig,
    SlurmSettings,
    TrainerGroupConfig,
)


def rollout_cmd(spec: LaunchSpec) -> list[str]:
    r = spec.rollout
    return ["sparrow", "rollout-node", "--model", "/models/Qwen3-14B", "--engine-tp", str(r.engine_tp)]


def big_spec(tmp_path, **cluster) -> LaunchSpec:
    return LaunchSpec(
        name="qwen3_14b_math",
        rollout_cmd=rollout_cmd,
        trainer_cmd=["sparrow", "train-worker", "--config", "/cfg/run config.yaml"],
        rollout=RolloutGroupConfig(nodes=2, gpus_per_node=8, engine_tp=2),
        trainer=TrainerGroupConfig(nodes=2, gpus_per_node=8, tp=4, pp=2),
        cluster=SlurmSettings(
            account="acct",
            partition="batch",
            time_limit="1-00:00:00",
            job_dir=str(tmp_path / "jobs"),
            **cluster,
        ),
        run_dir="/lustre/runs/q14b",
        mlflow_uri="http://mlflow.internal:5000",
    )


def test_dry_run_sbatch_for_14b_spec(tmp_path):
    sub = jobs.submit(big_spec(tmp_path), dry_run=True)
    script = sub.sbatch_script.read_text()
    head, _, body = script.partition("#SBATCH hetjob")
    assert "#SBATCH hetjob" in script and script.count("#SBATCH hetjob") == 1
    for part in (head, body):
        assert "#SBATCH --nodes=2" in part
        assert "#SBATCH --gpus-per-node=8" in part
        assert "#SBATCH --ntasks-per-node=1" in part
        assert "#SBATCH --account=acct" in part and "#SBATCH --partition=batch" in part
        assert "#SBATCH --requeue" in part and "#SBATCH --signal=B:USR1@300" in part
        assert "#SBATCH --time=1-00:00:00" in part
    sruns = [line for line in script.splitlines() if line.startswith("srun --het-group")]
    assert [re.search(r"--het-group=(\d)", s).group(1) for s in sruns] == ["0", "1"]
    rollout, trainer = sruns
    assert (
        "sparrow_megatron.launch.task rollout -- sparrow rollout-node --model /models/Qwen3-14B --engine-tp 2"
        in rollout
    )
    assert (
        "sparrow_megatron.launch.task trainer --launcher=torchrun --nnodes=2 --nproc-per-node=8 "
        "--rdzv-port=29500 --resume-flag=--resume -- sparrow train-worker --config '/cfg/run config.yaml'"
    ) in trainer
    for key, value in {
        "SPARROW_TP": "4",
        "SPARROW_PP": "2",
        "SPARROW_DP": "2",
        "SPARROW_ENGINES_PER_NODE": "4",
        "SPARROW_ENGINE_TP": "2",
        "SPARROW_ROLLOUT_NODES": "2",
        "SPARROW_TRAINER_NODES": "2",
        "SPARROW_RUN_DIR": "/lustre/runs/q14b",
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
    }.items():
        assert f"export {key}={value}\n" in script
    assert "trap sparrow_requeue USR1" in script
    # The handler is set before the setup's controller calls: Slurm may send USR1 up to 60 s early.
    assert script.index("trap sparrow_requeue USR1") < script.index("sparrow_node_addr() {")
    # USR1 asks the trainer to checkpoint after its step (the stop file); the requeue waits for the saved
    # marker, at most until 60 s before the limit (USR1 comes 300 s before it).
    assert 'touch "$SPARROW_RUN_DIR/.sparrow_stop"' in script
    assert '$(seq 1 1200); do [ -e "$SPARROW_RUN_DIR/.sparrow_saved" ] && break; sleep 0.2' in script
    assert 'export SPARROW_TRAINER_HEAD=$(sparrow_node_addr "${SPARROW_TRAINER_HOSTS%%,*}")' in script
    assert "--container-image" not in script  # plain srun without an image


def test_dry_run_with_container_uses_pyxis_flags(tmp_path):
    spec = big_spec(tmp_path, container_image=DEFAULT_IMAGE, container_mounts=["/lustre:/lustre"])
    script = jobs.submit(spec, dry_run=True).sbatch_script.read_text()
    sruns = [line for line in script.splitlines() if line.startswith("srun --het-group")]
    for line in sruns:
        assert f"--container-image {DEFAULT_IMAGE}" in line
        assert "--container-mounts /lustre:/lustre," in line


def test_local_executor_runs_both_commands(tmp_path):
    marker = tmp_path / "out"
    marker.mkdir()
    spec = LaunchSpec(
        name="local_small",
        rollout_cmd=[
            "bash",
            "-c",
            'echo "$SPARROW_ROLE $SPARROW_ROUTER_URL" > "$SPARROW_RUN_DIR/rollout.txt"',
        ],
        trainer_cmd=[
            "bash",
            "-c",
            'echo "$SPARROW_ROLE $SPARROW_TP $*" > "$SPARROW_RUN_DIR/trainer.txt"',
            "x",
        ],
        rollout=RolloutGroupConfig(nodes=1, gpus_per_node=0),
        trainer=TrainerGroupConfig(nodes=1, gpus_per_node=0, procs_per_node=1, launcher="none"),
        cluster=SlurmSettings(job_dir=str(tmp_path / "jobs"), python=sys.executable),
        run_dir=str(marker),
        executor="local",
    )
    jobs.submit(spec)
    assert (marker / "rollout.txt").read_text().strip() == "rollout http://127.0.0.1:30000"
    assert (marker / "trainer.txt").read_text().strip() == "trainer 1"


def test_each_job_dir_reads_its_own_slurm_job_registry(tmp_path):
    """A job submitted by another process (`sparrow submit`) into a second job dir is found by status in
    this one, which already used a first job dir."""
    from nemo_run.run.torchx_backend.schedulers import slurm as slurm_scheduler

    from sparrow_megatron.launch.build import use_job_dir

    use_job_dir(str(tmp_path / "first"))
    second = use_job_dir(str(tmp_path / "second"))
    assert str(second / ".slurm_jobs") == slurm_scheduler.SLURM_JOB_DIRS
