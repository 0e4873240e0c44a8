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

import pytest

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


@pytest.mark.sglang
@pytest.mark.slow
def test_distill_trains_exports_and_loads_the_adapter_each_step(tmp_path):
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps(SCHEDULE))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sparrow_megatron.cli.main", "train", "loop.steps=2",
           "loop.prompts_per_step=2", "rollout.n_samples=4", "loop.checkpoint_every=2",
           "rollout.max_inflight_per_engine=1", "rollout.temperature=3.0", f"rollout.schedule={schedule}",
           "distill.enabled=true", f"loop.run_dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
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
    assert (run_dir / "checkpoints" / "step_2" / "distill" / "adapter_tp0_pp0.pt").is_file()
