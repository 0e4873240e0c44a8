"""`rollout.server_args` (extra SGLang flags) reach every engine: the job's fleet, `sparrow serve`, the
Slurm rollout group; GPU launches of the sparrow backend get the flags it needs."""

from __future__ import annotations

import argparse
import shlex

import pytest

from sparrow_megatron.cli import serve
from sparrow_megatron.config import JobConfig, apply_overrides, validate
from sparrow_megatron.errors import UserError
from sparrow_megatron.loop.run import attached_rollout, fleet_options
from sparrow_megatron.loop.rundir import RunDir
from sparrow_megatron.rollout.config import FleetOptions, RolloutConfig
from sparrow_megatron.rollout.fleet import RolloutFleet
from sparrow_megatron.rollout.server import SPARROW_GPU_ARGS, server_command

FLAGS = ["--cuda-graph-max-bs", "64", "--chunked-prefill-size", "8192"]


def test_job_config_flags_reach_the_fleet_engines(tmp_path):
    cfg = apply_overrides(JobConfig(), [f"rollout.server_args={FLAGS!r}".replace("'", '"')])
    assert cfg.rollout.server_args == FLAGS
    fleet = RolloutFleet(attached_rollout(cfg), fleet_options(cfg, tmp_path, RunDir(tmp_path / "run")))
    cmd = server_command(fleet.rollout, fleet._engine_options(0, version=3), 30000, str(tmp_path))
    # after the fleet's own flags (SGLang keeps the last value), before its per-engine ones
    at = cmd.index(FLAGS[0])
    assert cmd[at : at + len(FLAGS)] == FLAGS and at > cmd.index("--attention-backend")
    assert cmd[at + len(FLAGS) : at + len(FLAGS) + 2] == ["--weight-version", "3"]


def test_gpu_launch_of_sparrow_disables_prefill_graphs_only():
    gpu = FleetOptions(device="cuda")
    cmd = server_command(RolloutConfig(attention_backend="sparrow"), gpu, 30000, "/m")
    joined = " ".join(cmd)
    assert " ".join(SPARROW_GPU_ARGS) in joined and "--page-size 16" in joined
    assert "--cuda-graph-backend-decode" not in cmd  # decode graphs stay on: the backend supports them
    own = RolloutConfig(server_args=["--cuda-graph-backend-prefill", "flashinfer"])
    assert server_command(own, gpu, 30000, "/m").count("--cuda-graph-backend-prefill") == 1  # the user's wins
    cpu = server_command(RolloutConfig(), FleetOptions(device="cpu"), 30000, "/m")
    assert cpu.count("--cuda-graph-backend-decode") == 1  # CPU: both off, as before


def test_sparrow_serve_passes_its_server_args(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "--model",
            str(tmp_path),
            f"--server-args={shlex.join(FLAGS[:2])}",
            "--server-args",
            "--chunked-prefill-size 8192",
        ]
    )
    rollout, _ = serve.build_config(args)
    assert rollout.server_args == FLAGS
    with pytest.raises(UserError, match="--tp-size is set by the fleet"):
        serve.build_config(
            parser.parse_args(["serve", "--model", str(tmp_path), "--server-args=--tp-size 2"])
        )
    with pytest.raises(UserError, match="--server-args"):
        serve.build_config(parser.parse_args(["serve", "--model", str(tmp_path), "--server-args=--x 'open"]))


def test_slurm_rollout_group_command_carries_them(tmp_path):
    from sparrow_megatron.cli.submit import load_launch_spec
    from tests.launch.test_job import RECIPES, paths

    overrides = [
        *paths(tmp_path, "qwen3_8b_math"),
        "cluster.account=a",
        'rollout.server_args=["--cuda-graph-max-bs", "64"]',
    ]
    spec = load_launch_spec(str(RECIPES / "qwen3_8b_math.py"), overrides, "slurm")
    rollout = spec.resolved_rollout_cmd()
    given = [a for a in rollout if a.startswith("--server-args=")]
    assert given == ["--server-args=--cuda-graph-max-bs 64"]
    # the sbatch script keeps it one word (srun ... serve ... '--server-args=...')
    from sparrow_megatron.launch import jobs

    text = jobs.submit(spec, dry_run=True).sbatch_script.read_text()
    srun = next(line for line in text.splitlines() if line.startswith("srun --het-group=0"))
    assert "--server-args=--cuda-graph-max-bs 64" in shlex.split(srun.split(" & pids")[0])
    # what `sparrow serve` on the node makes of it
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    model = rollout[rollout.index("--model") + 1]
    args = parser.parse_args(["serve", "--model", model, *given])
    assert serve.build_config(args)[0].server_args == ["--cuda-graph-max-bs", "64"]


def test_bad_server_args_name_the_field():
    with pytest.raises(UserError, match=r"field 'rollout.server_args\[1\]': expected str"):
        apply_overrides(JobConfig(), ["rollout.server_args=[--x, 3]"])
    with pytest.raises(UserError, match="field 'rollout.server_args': must start with an SGLang flag"):
        validate(apply_overrides(JobConfig(), ['rollout.server_args=["64"]']))
    owned = apply_overrides(
        JobConfig(), ['rollout.server_args=["--port=1", "--attention-backend", "triton"]']
    )
    with pytest.raises(UserError) as err:
        validate(owned)
    assert "--port is set by the fleet" in str(err.value)
    assert "--attention-backend is set by the fleet (from rollout.attention_backend)" in str(err.value)


def test_free_ports_are_picked_below_the_ephemeral_range(monkeypatch):
    """A polled port of the ephemeral range can be taken by the poll itself (TCP self-connect)."""
    from sparrow_megatron.rollout import server

    low = server._ephemeral_low()
    ports = {server.free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports) and len(ports) > 1
    assert server.free_port(start=low + 5) >= low + 5  # an explicit start is kept
    monkeypatch.setattr(server, "_ephemeral_low", lambda: 1024)  # no room below the range
    assert 1024 <= server.free_port() < 2024
