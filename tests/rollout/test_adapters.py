"""DistillSparse adapters on a real LoRA-enabled engine: sparse requests use the adapter and equal
HF+PEFT greedy output; dense requests never see it."""

from __future__ import annotations

import pytest
import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.rollout import (
    FleetOptions,
    LoraServerConfig,
    RolloutConfig,
    RolloutFleet,
    SamplingParams,
)
from sparrow_megatron.sparsity.schedule import Schedule
from tests.rollout.conftest import hf_greedy, load_hf

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(900)]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
PROMPTS = [[10, 11, 12, 13, 14], [40, 41, 42], [70, 5, 71, 6, 72, 7, 73]]
# Prompts are shorter than the budget, so this schedule decodes densely: the comparison with HF+PEFT
# (dense attention) is exact whatever the sparse backend does past the budget.
SPARSE = Schedule.fixed(64, dense_layers=(0,), name="lora-64")


def make_adapter(base_dir, out_dir, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_hf(base_dir)
    # init_lora_weights=False: B random and non-zero, so the adapter changes the output from step one.
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights=False, lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def lora_fleet(tiny_model, tmp_path_factory):
    options = FleetOptions(
        model_path=str(tiny_model),
        run_dir=str(tmp_path_factory.mktemp("lora_fleet_logs")),
        lora=LoraServerConfig(max_rank=8, target_modules=TARGETS, max_loras_per_batch=2),
        startup_timeout_s=600,
        health_interval_s=0,
    )
    fleet = RolloutFleet(RolloutConfig(engines=1, timeout_s=120), options)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.shutdown()


def test_sparse_requests_use_the_adapter_and_match_hf_peft_dense_never_sees_it(
    lora_fleet, tiny_model, tmp_path
):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=3)
    base_hf, peft_hf = load_hf(tiny_model), load_hf(tiny_model, adapter)
    want_base = [hf_greedy(base_hf, p, GREEDY.max_new_tokens) for p in PROMPTS]
    want_lora = [hf_greedy(peft_hf, p, GREEDY.max_new_tokens) for p in PROMPTS]
    assert want_base != want_lora  # the adapter is visible in greedy output

    name = lora_fleet.load_adapter(adapter)
    assert name == "distill-v1" and lora_fleet.active_adapter == name

    sparse = lora_fleet.generate(PROMPTS, GREEDY, schedule=SPARSE).flat()
    dense = lora_fleet.generate(PROMPTS, GREEDY).flat()
    for s in sparse:
        assert s.adapter == name
        assert s.output_ids == want_lora[s.prompt_index]
    for s in dense:
        assert s.adapter is None
        assert s.output_ids == want_base[s.prompt_index]
    with pytest.raises(UserError, match="dense path"):
        lora_fleet.generate(PROMPTS[:1], GREEDY, adapter=name)

    # A new version of the adapter (same base name) loads under a new name; the old one is unloaded.
    adapter2 = make_adapter(tiny_model, tmp_path / "adapter2", seed=4)
    want_lora2 = [hf_greedy(load_hf(tiny_model, adapter2), p, GREEDY.max_new_tokens) for p in PROMPTS]
    name2 = lora_fleet.load_adapter(adapter2)
    assert name2 == "distill-v2" and list(lora_fleet.adapters) == [name2]
    for s in lora_fleet.generate(PROMPTS, GREEDY, schedule=SPARSE).flat():
        assert s.adapter == name2
        assert s.output_ids == want_lora2[s.prompt_index]
    with pytest.raises(UserError, match="not loaded"):
        lora_fleet.generate(PROMPTS[:1], GREEDY, schedule=SPARSE, adapter=name)
