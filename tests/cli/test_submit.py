from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sparrow_megatron.cli import submit
from sparrow_megatron.errors import UserError

SPEC = """
from sparrow_megatron.launch.spec import SlurmSettings, LaunchSpec, RolloutGroupConfig, TrainerGroupConfig
SPEC = LaunchSpec(
    name="cli_spec",
    rollout_cmd=["sparrow", "rollout-node"],
    trainer_cmd=["sparrow", "train-worker"],
    rollout=RolloutGroupConfig(nodes=2, gpus_per_node=8, engine_tp=2),
    trainer=TrainerGroupConfig(nodes=2, gpus_per_node=8, tp=4, pp=2),
    cluster=SlurmSettings(job_dir={job_dir!r}),
)
"""


def parse(argv):
    # Only this module's commands: the CLI's other groups belong to other packages.
    parser = argparse.ArgumentParser()
    submit.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_submit_dry_run_with_overrides(tmp_path, capsys):
    path = tmp_path / "spec.py"
    path.write_text(SPEC.format(job_dir=str(tmp_path / "jobs")))
    args = parse(["submit", str(path), "trainer.nodes=4", "cluster.account=research", "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    script = next(line.split()[-1] for line in out.splitlines() if line.startswith("sbatch:"))
    text = Path(script).read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --account=research" in text


def test_submit_rejects_bad_override_before_submitting(tmp_path):
    path = tmp_path / "spec.py"
    path.write_text(SPEC.format(job_dir=str(tmp_path / "jobs")))
    args = parse(["submit", str(path), "trainer.tp=3", "--dry-run"])
    with pytest.raises(UserError, match="trainer.tp"):
        args.func(args)
    assert not (tmp_path / "jobs").exists()


def test_status_of_unknown_experiment_is_a_user_error(tmp_path):
    args = parse(["status", "nope_123", "--job-dir", str(tmp_path)])
    with pytest.raises(UserError, match="no experiment 'nope_123'"):
        args.func(args)
