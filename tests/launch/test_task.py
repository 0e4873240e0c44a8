from __future__ import annotations

import pytest

from sparrow_megatron.launch.task import build_command, parse_args


def test_trainer_gets_torchrun_and_resume_only_after_a_restart():
    env = {"SPARROW_TRAINER_HEAD": "10.0.0.7", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0"}
    kw = dict(
        launcher="torchrun", nnodes=2, nproc_per_node=8, rdzv_port=29500, resume_flag="--resume", python="py"
    )
    fresh = build_command("trainer", ["sparrow", "train-worker"], env, **kw)
    assert fresh == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.7:29500",
        "--rdzv-id=42-0",
        "--no-python",
        "sparrow",
        "train-worker",
    ]
    again = build_command("trainer", ["sparrow", "train-worker"], {**env, "SLURM_RESTART_COUNT": "1"}, **kw)
    assert again[-3:] == ["sparrow", "train-worker", "--resume"] and "--rdzv-id=42-1" in again


def test_rollout_runs_as_given_even_after_restart():
    cmd = build_command(
        "rollout", ["serve", "x"], {"SLURM_RESTART_COUNT": "2"}, launcher="torchrun", resume_flag="--resume"
    )
    assert cmd == ["serve", "x"]


def test_parse_args_splits_at_double_dash():
    args = parse_args(["trainer", "--launcher=none", "--resume-flag=--resume", "--", "prog", "--nnodes=9"])
    assert (args.role, args.launcher, args.resume_flag, args.cmd) == (
        "trainer",
        "none",
        "--resume",
        ["prog", "--nnodes=9"],
    )
    with pytest.raises(SystemExit):
        parse_args(["trainer"])
