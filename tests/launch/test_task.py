from __future__ import annotations

import pytest

from sparrow_megatron.launch.task import build_command, node_addr, parse_args


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


def test_sparrow_placeholders_are_filled_from_the_node_env_and_nothing_else():
    env = {"SPARROW_NODE_ADDR": "10.0.0.5", "SPARROW_NODE_RANK": "1", "HOME": "/root"}
    cmd = build_command(
        "rollout",
        ["serve", "--host", "${SPARROW_NODE_ADDR}", "--run-dir", "/r/node${SPARROW_NODE_RANK}", "$HOME"],
        env,
    )
    assert cmd == ["serve", "--host", "10.0.0.5", "--run-dir", "/r/node1", "$HOME"]
    with pytest.raises(SystemExit, match="SPARROW_MISSING is not set"):
        build_command("rollout", ["${SPARROW_MISSING}"], env)


def test_a_rollout_node_binds_to_its_own_entry_of_the_rollout_addresses():
    env = {"SPARROW_ROLE": "rollout", "SPARROW_ROLLOUT_ADDRS": "10.0.0.1,10.0.0.2", "SPARROW_NODE_RANK": "1"}
    assert node_addr(env) == "10.0.0.2"
    assert node_addr({**env, "SPARROW_NODE_RANK": "0"}) == "10.0.0.1"
