"""Job recipes as Slurm jobs: the Qwen3 recipes' dry runs and validation, and the tiny recipe end to end
on the real local Slurm (rollout group = `sparrow serve` on node1, trainer = `sparrow train` on node2)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from torchx.specs import AppState

from sparrow_megatron.cli.submit import load_launch_spec
from sparrow_megatron.config import load_config
from sparrow_megatron.errors import UserError
from sparrow_megatron.launch import jobs
from sparrow_megatron.launch.contract import resolve_rollout_urls, rollout_urls_from_env
from sparrow_megatron.launch.task import build_command

# free_port: below the ephemeral range. The trainer polls an engine's port before the engine binds it, and a
# poll from an ephemeral port of the same host can connect to itself (TCP self-connect) and hold the port.
from sparrow_megatron.rollout.server import free_port

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
QWEN3_SHAPES = {  # heads, layers (the public Qwen3 config.json files); 8 KV heads for all
    "qwen3_1p7b_math": (16, 28),
    "qwen3_1p7b_code": (16, 28),
    "qwen3_4b_math": (32, 36),
    "qwen3_8b_math": (32, 36),
    "qwen3_14b_math": (40, 40),
}


def fake_checkpoint(tmp_path: Path, heads: int, layers: int) -> tuple[Path, Path]:
    """A model dir with a Qwen3 config.json (what validation reads) and a train file."""
    model = tmp_path / "model"
    model.mkdir()
    config = {
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "num_hidden_layers": layers,
        "max_position_embeddings": 40960,
    }
    (model / "config.json").write_text(json.dumps(config))
    train = tmp_path / "train.jsonl"
    train.write_text('{"problem": "1+1", "answer": "2"}\n')
    return model, train


def paths(tmp_path: Path, recipe: str) -> list[str]:
    model, train = fake_checkpoint(tmp_path, *QWEN3_SHAPES[recipe])
    return [f"model.hf_dir={model}", f"data.train_path={train}", f"cluster.job_dir={tmp_path / 'jobs'}"]


@pytest.mark.parametrize("recipe", sorted(QWEN3_SHAPES))
def test_every_qwen3_recipe_validates_with_real_paths_and_names_the_placeholders(recipe, tmp_path):
    source = str(RECIPES / f"{recipe}.py")
    with pytest.raises(UserError) as err:
        load_config(source)
    assert "field 'model.hf_dir': /path/to/Qwen3-" in str(err.value)
    assert "field 'data.train_path': /path/to/" in str(err.value)
    cfg = load_config(source, paths(tmp_path, recipe))
    size = recipe.split("_")[1].replace("p", ".")
    assert cfg.rollout.schedule == f"qwen3-{size}-0.86" and cfg.monitor.tau == 0.86
    task = recipe.split("_")[2]
    assert cfg.data.kind == task
    assert cfg.data.max_response_tokens == {"math": 37_000, "code": 24_000}[task]
    assert cfg.cluster.executor == "slurm" and cfg.cluster.gpus_per_node == 8


def test_recipe_validation_catches_tp_against_heads_and_gpus_before_submission(tmp_path):
    source = str(RECIPES / "qwen3_14b_math.py")
    base = [*paths(tmp_path, "qwen3_14b_math"), "cluster.account=acct"]
    # 40 heads: TP 16 does not divide them; TP 3 divides neither the heads nor the 8 GPUs per node.
    with pytest.raises(
        UserError, match="field 'trainer.tp': 16 does not divide the model's 40 attention heads"
    ):
        load_launch_spec(source, [*base, "trainer.tp=16"], None)
    with pytest.raises(UserError, match="field 'trainer.tp': 3 does not divide cluster.gpus_per_node=8"):
        load_launch_spec(source, [*base, "trainer.tp=3"], None)
    with pytest.raises(UserError, match="field 'rollout.engine_tp': 3 does not divide cluster.gpus_per_node"):
        load_launch_spec(source, [*base, "rollout.engine_tp=3"], None)
    with pytest.raises(UserError, match="field 'rollout.engines': 7 engines do not spread evenly"):
        load_launch_spec(source, [*base, "rollout.engines=7"], None)
    no_account = [o for o in base if not o.startswith("cluster.account=")]
    with pytest.raises(UserError, match="field 'cluster.account': must be set"):
        load_launch_spec(source, no_account, None)
    assert not (tmp_path / "jobs").exists()  # nothing was written, let alone submitted


def test_qwen3_14b_dry_run_writes_the_het_sbatch_script(tmp_path):
    source = str(RECIPES / "qwen3_14b_math.py")
    overrides = [*paths(tmp_path, "qwen3_14b_math"), "cluster.account=acct", "cluster.partition=batch"]
    spec = load_launch_spec(source, overrides, "slurm")
    sub = jobs.submit(spec, dry_run=True)
    text = sub.sbatch_script.read_text()
    header, _, body = text.partition("#SBATCH hetjob")
    # Two het groups of 2 nodes x 8 GPUs: rollout first, trainer second, one sbatch.
    for group in (header, body):
        assert "#SBATCH --nodes=2" in group and "#SBATCH --gpus-per-node=8" in group
        assert "#SBATCH --account=acct" in group and "#SBATCH --partition=batch" in group
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=B:USR1@300" in header
    assert "export SPARROW_ENGINES_PER_NODE=4" in text and "export SPARROW_ENGINE_BASE_PORT=30010" in text
    assert "export SPARROW_ROLLOUT_ADDRS" in text and "export HF_HUB_OFFLINE=1" in text
    sruns = {int(m.group(1)): m.group(2) for m in re.finditer(r"srun --het-group=(\d) (.*) & pids", text)}
    assert sorted(sruns) == [0, 1]
    rollout = shlex.split(sruns[0])
    rollout = rollout[rollout.index("serve") :]
    assert "--exact-ports" in rollout  # the trainer computes the URLs: no silent move to a free port
    rollout.remove("--exact-ports")
    opts = dict(zip(rollout[1::2], rollout[2::2], strict=True))
    # One `sparrow serve` per rollout node: 4 engines of TP 2 at the node's address, the 14B schedule.
    assert opts["--engines"] == "4" and opts["--tp"] == "2" and opts["--port-base"] == "30010"
    assert opts["--host"] == "${SPARROW_NODE_ADDR}" and opts["--schedule"] == "qwen3-14b-0.86"
    assert opts["--model"] == overrides[0].split("=", 1)[1]
    assert "--lora-rank" not in opts  # DistillSparse off: engines without LoRA
    trainer = shlex.split(sruns[1])
    wrapper = trainer[trainer.index("sparrow_megatron.launch.task") + 1 : trainer.index("--")]
    assert wrapper == [
        "trainer",
        "--launcher=torchrun",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-port=29500",
        "--resume-flag=--resume",
    ]
    cmd = trainer[trainer.index("--") + 1 :]
    assert cmd[cmd.index("train") + 1] == source
    assert overrides[0] in cmd and "rollout.urls=env" in cmd
    assert f"loop.run_dir={REPO / 'runs' / 'qwen3-14b-math'}" in cmd or any(
        a.startswith("loop.run_dir=/") for a in cmd
    )
    # What the wrapper runs on a trainer node: torchrun over 2 nodes x 8 GPUs, rendezvous at the head.
    env = {"SPARROW_TRAINER_HEAD": "10.0.0.3", "SLURM_JOB_ID": "77"}
    final = build_command(
        "trainer", cmd, env, launcher="torchrun", nnodes=2, nproc_per_node=8, rdzv_port=29500, python="py"
    )
    assert final[:9] == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.3:29500",
        "--rdzv-id=77-0",
        "--no-python",
    ]
    # The trainer's config: TP 4 x PP 2 over 16 GPUs (DP 2), 8 engines of TP 2.
    assert "export SPARROW_TP=4" in text and "export SPARROW_PP=2" in text and "export SPARROW_DP=2" in text


def test_distill_recipe_starts_its_engines_with_the_adapters_capacity(tmp_path):
    overrides = [
        *paths(tmp_path, "qwen3_14b_math"),
        "cluster.account=a",
        "distill.enabled=true",
        "distill.rank=32",
    ]
    spec = load_launch_spec(str(RECIPES / "qwen3_14b_math.py"), overrides, "slurm")
    rollout = spec.resolved_rollout_cmd()
    assert rollout[rollout.index("--lora-rank") + 1] == "32"
    # The adapter's default targets (all-linear, as the reference's DistillSparse) reach the engines.
    want = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    assert rollout[rollout.index("--lora-target-modules") + 1] == want


def test_local_executor_runs_the_trainer_with_its_own_engines(tmp_path):
    spec = load_launch_spec(str(RECIPES / "tiny_cpu.py"), [f"loop.run_dir={tmp_path / 'run'}"], "local")
    assert spec.executor == "local"
    trainer = spec.resolved_trainer_cmd()
    assert trainer[trainer.index("train") + 1] == str(RECIPES / "tiny_cpu.py")
    assert "rollout.urls=env" not in trainer and f"loop.run_dir={tmp_path / 'run'}" in trainer
    assert "serve" not in spec.resolved_rollout_cmd()  # nothing that would outlive the trainer


def test_rollout_urls_from_the_env_contract():
    env = {
        "SPARROW_ROLLOUT_ADDRS": "10.0.0.1,10.0.0.2",
        "SPARROW_ENGINE_BASE_PORT": "30010",
        "SPARROW_ENGINES_PER_NODE": "2",
    }
    assert resolve_rollout_urls(["env"], env) == [
        "http://10.0.0.1:30010",
        "http://10.0.0.1:30011",
        "http://10.0.0.2:30010",
        "http://10.0.0.2:30011",
    ]
    assert resolve_rollout_urls(["http://a:1/"], env) == ["http://a:1"]
    with pytest.raises(UserError, match="SPARROW_ENGINE_BASE_PORT"):
        rollout_urls_from_env({"SPARROW_ROLLOUT_ADDRS": "h", "SPARROW_ENGINES_PER_NODE": "1"})
    with pytest.raises(UserError, match="field 'rollout.urls\\[0\\]'"):
        load_config(None, ["rollout.urls=ftp://x"])


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_tiny_recipe_trains_as_a_het_job_on_the_local_slurm(local_slurm, tmp_path):
    run_dir = tmp_path / "run"
    spec = load_launch_spec(
        str(RECIPES / "tiny_cpu.py"),
        [
            "cluster.account=sparrow",
            "cluster.partition=debug",
            "cluster.time_limit=00:40:00",
            "cluster.requeue_signal_s=60",
            f"cluster.job_dir={tmp_path / 'jobs'}",
            f"cluster.python={sys.executable}",
            f"cluster.engine_base_port={free_port()}",
            f"cluster.rdzv_port={free_port()}",
            "cluster.rollout_start_timeout_s=1200",
            "loop.steps=2",
            "loop.prompts_per_step=2",
            "rollout.n_samples=4",
            "loop.eval_every=0",
            f"loop.run_dir={run_dir}",
        ],
        "slurm",
    )
    sub = jobs.submit(spec)
    final = jobs.wait(sub.experiment_id, spec.cluster.job_dir, timeout_s=2200, poll_s=10)
    logs = jobs.logs(sub.experiment_id, spec.cluster.job_dir)
    everything = "\n".join(f"==> {p} <==\n{t[-6000:]}" for p, t in logs.items())
    assert [s.state for s in final] == [AppState.SUCCEEDED], everything
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2], steps
    # The engine ran on node1 (the rollout group) and the trainer attached to it from node2.
    assert any("engine 0: http://127.0.0.1:" in t for t in logs.values()), everything
    assert any(
        "all 1 rollout engine(s) healthy" in t or "sparrow task [trainer node 0]" in t for t in logs.values()
    )
    assert (run_dir / "engines" / "node0").is_dir()


@pytest.mark.slurm
@pytest.mark.timeout(1200)
def test_recipe_job_whose_engines_cannot_start_is_failed_with_the_reason_in_its_log(local_slurm, tmp_path):
    spec = load_launch_spec(
        str(RECIPES / "tiny_cpu.py"),
        [
            "cluster.account=sparrow",
            "cluster.time_limit=00:20:00",
            "cluster.requeue_signal_s=60",
            f"cluster.job_dir={tmp_path / 'jobs'}",
            f"cluster.python={sys.executable}",
            f"cluster.engine_base_port={free_port()}",
            f"cluster.rdzv_port={free_port()}",
            "rollout.attention_backend=no-such-backend",
            f"loop.run_dir={tmp_path / 'run'}",
        ],
        "slurm",
    )
    sub = jobs.submit(spec)
    final = jobs.wait(sub.experiment_id, spec.cluster.job_dir, timeout_s=1000, poll_s=5)
    logs = jobs.logs(sub.experiment_id, spec.cluster.job_dir)
    everything = "\n".join(f"==> {p} <==\n{t[-4000:]}" for p, t in logs.items())
    assert [s.state for s in final] == [AppState.FAILED], everything
    rollout_log = next(t for p, t in logs.items() if p.name.startswith("log-sparrow.tiny-cpu-0_"))
    assert "no-such-backend" in rollout_log and "EngineStartError" in rollout_log, everything
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_math_recipe_through_sparrow_submit_trains_on_the_local_slurm(local_slurm, tmp_path):
    """The 1.7B math recipe as its users submit it: the `sparrow submit` command (options after the
    overrides), the user's own Qwen3 checkpoint and a DAPO-Math parquet file, only size overrides (the
    recipe rehearsal's), on CPU nodes of the local cluster: 2 steps with a checkpoint each."""
    import subprocess

    from tests.recipes import fixtures
    from tests.recipes.test_rehearsal import SIZE

    model = fixtures.make_user_qwen3(tmp_path / "Qwen3-tiny")
    train = fixtures.write_dapo_parquet(tmp_path / "dapo-math-17k.parquet")
    run_dir, job_dir = tmp_path / "run", tmp_path / "jobs"
    overrides = [
        f"model.hf_dir={model}",
        f"data.train_path={train}",
        *[s for s in SIZE if not s.startswith("loop.eval")],
        "loop.eval_every=0",
        "cluster.gpus_per_node=0",  # CPU nodes: one trainer process, CPU engines
        "cluster.account=sparrow",
        "cluster.partition=debug",
        "cluster.time_limit=00:40:00",
        "cluster.requeue_signal_s=60",
        f"cluster.job_dir={job_dir}",
        f"cluster.python={sys.executable}",
        f"cluster.engine_base_port={free_port()}",
        f"cluster.rdzv_port={free_port()}",
        "cluster.rollout_start_timeout_s=1200",
        f"loop.run_dir={run_dir}",
    ]
    recipe = str(RECIPES / "qwen3_1p7b_math.py")
    cmd = [
        sys.executable,
        "-m",
        "sparrow_megatron.cli.main",
        "submit",
        recipe,
        *overrides,
        "--executor",
        "slurm",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    experiment = re.search(r"^experiment: (\S+)$", out.stdout, re.M).group(1)
    try:
        final = jobs.wait(experiment, str(job_dir), timeout_s=1200, poll_s=10)
    finally:
        logs = jobs.logs(experiment, str(job_dir))
        everything = "\n".join(f"==> {p} <==\n{t[-6000:]}" for p, t in logs.items())
        print(everything[-20000:])  # shown by pytest when the wait itself fails
    assert [s.state for s in final] == [AppState.SUCCEEDED], everything
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == [1, 2], rows
    assert all(r["train/num_tokens"] > 0 for r in rows)
    for step in (1, 2):
        assert (run_dir / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()
    ran = load_config(str(run_dir / "config.yaml"), ["rollout.urls=[]"], check_paths=False)
    assert ran.rollout.schedule == "qwen3-1.7b-0.86" and ran.data.kind == "math"
