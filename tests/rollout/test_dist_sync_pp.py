"""rollout.weight_sync=distributed with a pipeline-parallel trainer: a real Megatron PP=2 trainer under
torchrun (gloo) syncs real SGLang CPU engines, each stage's weights sent by the rank that holds them.

The engines serve a checkpoint (weights A); the trainer holds other weights (B) of the same shape. After
the sync the engines' greedy tokens are those of B (by HF), and each stage's sender broadcast exactly its
own stage's bytes (one copy of the model in all, none relayed through rank 0).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparrow_megatron.models.tiny import TinyQwen3Shape, make_tiny_qwen3
from tests.rollout.conftest import hf_greedy, load_hf

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("pp_sync_worker.py")
# Untied and 4 layers: two stages of 2 layers, a greedy output that shows the weights.
SHAPE = TinyQwen3Shape(num_hidden_layers=4, tie_word_embeddings=False)
PROMPTS = [[10, 11, 12, 13, 14], [40, 41, 42]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp_sync")
    return make_tiny_qwen3(root / "a", SHAPE, seed=0), make_tiny_qwen3(root / "b", SHAPE, seed=1)


@pytest.fixture(scope="module")
def engines(models, tmp_path_factory):
    """Two engines on weights A (module-scoped: every sync here goes to them)."""
    from sparrow_megatron.rollout import FleetOptions, RolloutConfig, RolloutFleet

    options = FleetOptions(model_path=str(models[0]), run_dir=str(tmp_path_factory.mktemp("pp_sync_logs")),
                           startup_timeout_s=600, health_interval_s=0)  # fmt: skip
    fleet = RolloutFleet(RolloutConfig(engines=2, timeout_s=120), options)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.shutdown()


def _stage_of(name: str, layers: int, pp: int) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) // (layers // pp)
    return 0 if name.startswith("model.embed_tokens") else pp - 1  # final norm and lm_head: last stage


def test_each_pp_stage_sends_its_own_weights_to_the_engines(engines, models, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
           "--model-dir", str(models[1]), "--urls", ",".join(engines.urls), "--out", str(out), "--pp", "2"]  # fmt: skip
    victim = engines.engines[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PP_SYNC_PROMPTS": json.dumps(PROMPTS),
           "PP_SYNC_KILL_PID": str(victim.server.pid)}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((out / "result.json").read_text())

    # Each stage's sender broadcast its own stage's tensors, once: together one copy of the model.
    want = [0, 0]
    for name, t in load_file(str(models[1] / "model.safetensors")).items():
        want[_stage_of(name, SHAPE.num_hidden_layers, 2)] += t.numel() * t.element_size()
    for metrics in result["pushes"]:
        assert [metrics["sync/bytes_stage0"], metrics["sync/bytes_stage1"]] == want
        assert metrics["sync/bytes"] == sum(want)
    assert result["builds"] == 1  # the second sync reused the stage groups
    assert result["version"] == 2

    # The engines now serve the trainer's weights (B), both of them.
    hf_b = load_hf(models[1])
    want_tokens = [hf_greedy(hf_b, p, 12) for p in PROMPTS]
    assert {s[1] for s in result["samples"]} == {0, 1}
    for prompt_index, _engine, version, tokens in result["samples"]:
        assert version == 2 and tokens == want_tokens[prompt_index]
    hf_a = load_hf(models[0])
    assert [hf_greedy(hf_a, p, 12) for p in PROMPTS] != want_tokens  # the test can tell A from B

    # Engine 1 killed in the middle of the third sync: every stage's sender left the failed try (none
    # waits on the lost engine), the groups were rebuilt with engine 0 and the sync ran again.
    after = result["after_kill"]
    assert after["builds"] == 2 and after["version"] == 3
    assert result["pushes"][2]["sync/bytes_stage1"] == want[1]
    assert {s[1] for s in after["samples"]} == {0}
    for prompt_index, _engine, version, tokens in after["samples"]:
        assert version == 3 and tokens == want_tokens[prompt_index]
