"""DistillSparse in the RL loop, end to end: a real LoRA-enabled SGLang engine and the Megatron trainer.

`sparrow train` with distill.enabled and a sparse schedule, 2 steps: each step trains the adapter after
the base update, exports it as PEFT and loads it into the engine under a new version (sparse requests
of the next step use it); checkpoints carry the adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sparrow_megatron.loop.tracking import default_store, default_uri, local_artifacts, saved_run_id

# Budget 64 tokens against ~1.1K-token prompts: every decode step is sparse (layer 0 stays dense).
SCHEDULE = {
    "schema_version": 1,
    "name": "tiny-64",
    "bin_width": 256,
    "budgets": [64],
    "page_size": 16,
    "sink_pages": 1,
    "local_pages": 2,
    "dense_layers": [0],
}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_distill_needs_a_sparse_schedule(tmp_path):
    cmd = [sys.executable, "-m", "sparrow_megatron.cli.main", "train", "distill.enabled=true",
           "rollout.schedule=dense", "monitor.controller.enabled=false", f"loop.run_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "distill.enabled" in proc.stderr and "dense" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "engines").exists()


DISTILL_RUN = ["loop.prompts_per_step=2", "rollout.n_samples=4", "rollout.max_inflight_per_engine=1",
               "rollout.temperature=3.0", "distill.enabled=true", "loop.eval_every=0"]  # fmt: skip


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def schedule_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("schedule") / "schedule.json"
    path.write_text(json.dumps(SCHEDULE))
    return path


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, schedule_file):
    run_dir = tmp_path_factory.mktemp("distill") / "run"
    cmd = [sys.executable, "-m", "sparrow_megatron.cli.main", "train", "loop.steps=2", *DISTILL_RUN,
           "loop.checkpoint_every=2", f"rollout.schedule={schedule_file}", f"loop.run_dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir


@pytest.mark.sglang
@pytest.mark.slow
def test_distill_trains_exports_and_loads_the_adapter_each_step(single_process_run):
    run_dir = single_process_run
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["distill/adapter_version"] == r["step"]  # one new adapter version per step
        assert r["distill/num_tokens"] == r["train/num_tokens"] > 0
        assert r["distill/grad_norm"] > 0 and r["distill/kl"] >= 0
        for name in ("base", "adapter"):
            assert 0.0 < r[f"distill/probe_p5_{name}"] <= r[f"distill/probe_mean_{name}"] <= 1.0
    # The adapter is non-zero from step 1 on, so step 2's sparse policy differs from the base's.
    assert rows[1]["distill/probe_mean_adapter"] != rows[1]["distill/probe_mean_base"]
    # Only the latest adapter stays on disk; the engine loaded both versions and dropped the first.
    assert [p.name for p in (run_dir / "adapters").iterdir()] == ["step_000002"]
    assert (run_dir / "adapters" / "step_000002" / "adapter_model.safetensors").is_file()
    engine_log = (run_dir / "engines" / "engine0.log").read_text()
    assert "distill-v1" in engine_log and "distill-v2" in engine_log
    assert (run_dir / "checkpoints" / "step_2" / "distill" / "adapter_state.pt").is_file()
    # MLflow holds the final HF checkpoint and the final adapter (PEFT files) as artifacts.
    # (A local store's artifacts sit in mlartifacts/ beside it; a plain sqlite client cannot list them.)
    run = MlflowClient(default_uri(run_dir)).get_run(saved_run_id(run_dir))
    root = local_artifacts(default_store(run_dir), run.info.artifact_uri)
    adapter = {p.name for p in (root / "final_adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= adapter
    assert (root / "final_hf" / "model.safetensors").is_file()


@pytest.mark.sglang
@pytest.mark.slow
def test_distill_under_torchrun_tp2_follows_rank0(single_process_run, schedule_file, tmp_path):
    """Rank 1 replays the distill calls (step, export, probe, save): TP=2 gives the one-process numbers
    of step 1 (same base weights, same samples) and the checkpoint holds the whole adapter."""
    run_dir = tmp_path / "tp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "sparrow_megatron.cli.main", "train", "loop.steps=1", *DISTILL_RUN, "trainer.tp=2",
           "loop.checkpoint_every=1", f"rollout.schedule={schedule_file}", f"loop.run_dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(
        cmd, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (got,) = _rows(run_dir)
    want = _rows(single_process_run)[0]
    assert got["distill/adapter_version"] == 1 and got["distill/num_tokens"] == want["distill/num_tokens"]
    for key in ("distill/loss", "distill/kl", "distill/grad_norm", "distill/probe_mean_base",
                "distill/probe_mean_adapter"):  # fmt: skip
        assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), key

    # The checkpoint's adapter state is layout-free: the TP=2 run saved the one-process shapes.
    def shapes(state_file: Path) -> dict:
        state = torch.load(state_file, weights_only=True)
        return {k: [tuple(t.shape) for t in parts] for k, parts in state["params"].items()}

    tp2 = shapes(run_dir / "checkpoints" / "step_1" / "distill" / "adapter_state.pt")
    assert tp2 == shapes(single_process_run / "checkpoints" / "step_2" / "distill" / "adapter_state.pt")
