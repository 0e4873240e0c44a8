"""Real SGLang fleets on tiny random Qwen3 checkpoints (CPU platform plugin), shared per session.

Servers are few and session-scoped (each takes ~25 s to start and ~1.2 GB); every fixture shuts its
fleet down (process groups) in teardown even when a test fails.
"""

from __future__ import annotations

import pytest
import torch

from sparrow_megatron.models.tiny import TinyQwen3Shape, make_tiny_qwen3

# Untied embeddings: with tied ones a random tiny model mostly repeats the last prompt token, whatever the
# seed, and a weight update would not show in greedy output.
SHAPE = TinyQwen3Shape(num_hidden_layers=3, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("rollout_tiny_a"), SHAPE, seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory):
    """Same shape, other weights: the target of weight updates."""
    return make_tiny_qwen3(tmp_path_factory.mktemp("rollout_tiny_b"), SHAPE, seed=1)


def load_hf(path, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation without EOS stopping (the fleet requests use ignore_eos)."""
    ids = torch.tensor([prompt_ids])
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def state_buckets(path, bucket_size: int = 8):
    """The checkpoint's (hf_name, tensor) pairs in buckets, as the trainer's exporter yields them."""
    from safetensors.torch import load_file

    named = sorted(load_file(str(path / "model.safetensors")).items())
    for i in range(0, len(named), bucket_size):
        yield named[i : i + bucket_size]


@pytest.fixture(scope="session")
def fleet(tiny_model, tmp_path_factory):
    """Two engines on the `sparrow` backend."""
    from sparrow_megatron.rollout import FleetOptions, RolloutConfig, RolloutFleet

    rollout = RolloutConfig(engines=2, timeout_s=120, max_inflight_per_engine=8)
    options = FleetOptions(
        model_path=str(tiny_model),
        run_dir=str(tmp_path_factory.mktemp("fleet_logs")),
        startup_timeout_s=600,
        health_interval_s=2.0,
    )
    fleet = RolloutFleet(rollout, options)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.shutdown()
