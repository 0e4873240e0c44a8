"""Every file in recipes/ run as a user runs it, in miniature: `sparrow train RECIPE` on CPU.

Each rehearsal is the real CLI in a subprocess with the recipe file and only size overrides (TP/PP 1,
one engine, 2 steps of 2 prompts x 2 samples, an 8-token generation cutoff), on a tiny Qwen3 checkpoint
with its own byte-level BPE tokenizer and dataset files in the public formats (tests/recipes/fixtures.py).
The trainer attaches to one running engine through `rollout.urls`, the path a Slurm job's trainer group
takes; each fresh run first reloads the base weights into it, as a fresh engine would have them.

Every recipe: 2 steps, evaluation before step 1 and after step 2, a checkpoint per step, the final HF
export, MLflow. Kill + `--resume` (SIGKILL once the step-1 checkpoint is committed, then `--resume`
finishes step 2) for the 1.7B math and code recipes only: the larger math recipes differ from 1.7B
by layout alone, which the size overrides replace, so their resume would rehearse the same code
again. The 8B math recipe runs with DistillSparse on. The code recipe's rewards run the tests in the
real sandbox (reward.isolation as the recipe has it: bwrap): the random model writes no program, so
the run's own task then judges a right and a wrong one. `recipes/tiny_cpu.py` is the embedded default:
tests/loop/test_run.py rehearses it (run, kill, resume) and tests/launch/test_job.py submits it, as
`sparrow submit` does, as a heterogeneous job on the local Slurm cluster; here it is checked to be that
default. The Qwen3 recipes' `sparrow submit --dry-run` scripts are tests/launch/test_job.py's.

A recipe added to recipes/ without an entry in REHEARSALS fails test_every_recipe_is_rehearsed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SPARROW = [sys.executable, "-m", "sparrow_megatron.cli.main", "train"]
# Only sizes: parallelism, fleet size, batch, lengths, steps; everything else is the recipe's.
SIZE = [
    "trainer.tp=1",
    "trainer.pp=1",
    "rollout.engines=1",
    "rollout.engine_tp=1",
    "cluster.nodes=2",  # one rollout node, one trainer node: what one engine and TP 1 need
    "cluster.rollout_nodes=1",
    "loop.steps=2",
    "loop.prompts_per_step=2",
    "rollout.n_samples=2",
    "data.max_response_tokens=8",
    "loop.checkpoint_every=1",
    "loop.eval_every=2",
    "loop.eval_prompts=2",
    "loop.eval_samples=2",
]


@dataclass(frozen=True)
class Rehearsal:
    train: str  # a user_files key
    eval: str
    resume: bool = False  # kill after the step-1 checkpoint, then --resume
    extra: tuple[str, ...] = ()


REHEARSALS = {
    "qwen3_1p7b_math": Rehearsal("dapo", "aime", resume=True),
    "qwen3_1p7b_code": Rehearsal("taco", "lcb", resume=True),
    "qwen3_4b_math": Rehearsal("polaris", "aime"),
    "qwen3_8b_math": Rehearsal("dapo", "aime", extra=("distill.enabled=true",)),
    "qwen3_14b_math": Rehearsal("polaris", "aime"),
}
EMBEDDED = {"tiny_cpu"}  # rehearsed by tests/loop/test_run.py and, on Slurm, tests/launch/test_job.py


def test_every_recipe_is_rehearsed():
    shipped = {p.stem for p in (REPO / "recipes").glob("*.py")}
    missing = shipped - set(REHEARSALS) - EMBEDDED
    assert not missing, f"recipes without a rehearsal in {__file__}: {sorted(missing)}"
    assert not (set(REHEARSALS) | EMBEDDED) - shipped, "rehearsals of recipes that no longer exist"


def test_tiny_cpu_recipe_is_the_embedded_default():
    from sparrow_megatron.config import load_config
    from sparrow_megatron.loop.default import tiny_cpu

    recipe = load_config(str(REPO / "recipes" / "tiny_cpu.py"), []).to_flat_dict()
    default = tiny_cpu().to_flat_dict()
    differ = {k for k in recipe if recipe[k] != default.get(k)}
    assert differ and all(k.startswith("cluster.") for k in differ), differ


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _command(name: str, files: dict, url: str, run_dir: Path, store: Path) -> list[str]:
    r = REHEARSALS[name]
    return [
        *SPARROW,
        str(REPO / "recipes" / f"{name}.py"),
        f"model.hf_dir={files['model']}",
        f"data.train_path={files[r.train]}",
        f"data.eval={{heldout: {files[r.eval]}}}",  # a named eval set, as users write it
        f"rollout.urls=[{url}]",
        f"loop.run_dir={run_dir}",
        f"tracking.mlflow_uri=sqlite:///{store}",
        *SIZE,
        *r.extra,
    ]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _run_until_checkpoint(cmd: list[str], run_dir: Path, log: Path, timeout: float = 600) -> None:
    """Start the run and SIGKILL its process group once the step-1 checkpoint is complete."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    marker = run_dir / "checkpoints" / "step_1" / "COMPLETE"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"run ended (rc {proc.returncode}) before its step-1 checkpoint:\n{log.read_text()[-4000:]}"
            )
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.parametrize("name", sorted(REHEARSALS))
def test_recipe_rehearsal(name, user_files, engine, tmp_path, mlflow_store):
    fleet, url = engine
    fleet.sync_weights_from_disk(user_files["model"])  # a fresh engine holds the base weights
    run_dir = tmp_path / "run"
    cmd = _command(name, user_files, url, run_dir, mlflow_store)
    log = tmp_path / "first.log"
    if REHEARSALS[name].resume:
        _run_until_checkpoint(cmd, run_dir, log)
        assert [r["step"] for r in _rows(run_dir) if "eval/n" not in r][:1] == [1]
        cmd = [*cmd, "--resume"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    if REHEARSALS[name].resume:
        assert "from step 1" in proc.stdout + proc.stderr, proc.stdout + proc.stderr[-3000:]

    rows = _rows(run_dir)
    steps = [r for r in rows if "eval/n" not in r]
    evals = [r for r in rows if "eval/n" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]
    for r in steps:
        assert r["train/num_tokens"] > 0 and 0.0 <= r["reward/mean"] <= 1.0
    assert all(0.0 <= r["eval/heldout/dense/mean_at_2"] <= 1.0 for r in evals)
    for step in (1, 2):
        assert (run_dir / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()
    assert (run_dir / "final_hf" / "config.json").is_file()
    # The recipe's own values survive: only the size overrides changed it.
    from sparrow_megatron.config import load_config

    recipe = load_config(str(REPO / "recipes" / f"{name}.py"), [], check_paths=False).to_flat_dict()
    import yaml

    ran = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert ran["rollout"]["schedule"] == recipe["rollout.schedule"]
    assert ran["grpo"]["eps_high"] == recipe["grpo.eps_high"]
    assert ran["data"]["kind"] == recipe["data.kind"]
    if "distill.enabled=true" in REHEARSALS[name].extra:
        assert [r["distill/adapter_version"] for r in steps] == [1, 2]
    if recipe["data.kind"] == "code":
        _judge_in_the_sandbox(name, user_files, run_dir)


# The first TACO / LiveCodeBench problem: read two integers, print their sum.
RIGHT = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"


def _judge_in_the_sandbox(name: str, files: dict, run_dir: Path) -> None:
    """The random model writes no program, so its rewards are 0 without running one: the recipe's
    task (as the run built it, from its config.yaml) judges a right and a wrong program in the sandbox."""
    from sparrow_megatron.config import load_config
    from sparrow_megatron.data.datasets import load_tokenizer
    from sparrow_megatron.loop.tasks import make_task

    cfg = load_config(str(run_dir / "config.yaml"), ["rollout.urls=[]"])
    assert cfg.reward.isolation == "bwrap"
    task = make_task(cfg, load_tokenizer(files["model"]))
    for split in ("train", "heldout"):
        prompt = next(p for p in task.prompts(split, 0, 4) if "a + b" in p.example.problem)
        assert task.reward(prompt, RIGHT) == 1.0 and task.reward(prompt, WRONG) == 0.0
