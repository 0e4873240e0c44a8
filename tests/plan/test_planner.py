"""The plan of whole jobs: every GPU recipe fits the GPUs its docs name (H100/H200 nodes), the verdicts
follow the terms, the model shape comes from config.json or the name, and the 14B terms add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparrow_megatron.config import JobConfig, load_recipe
from sparrow_megatron.errors import UserError
from sparrow_megatron.plan import DEVICE_BYTES, make_plan
from sparrow_megatron.plan.memory import GIB
from sparrow_megatron.plan.planner import model_shape

REPO = Path(__file__).resolve().parents[2]
GPU_RECIPES = ["qwen3_1p7b_math", "qwen3_1p7b_code", "qwen3_4b_math", "qwen3_8b_math", "qwen3_14b_math"]


def _recipe(name: str) -> JobConfig:
    return load_recipe(REPO / "recipes" / f"{name}.py")


@pytest.mark.parametrize("hardware", ["h100", "h200"])
@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_every_gpu_recipe_fits_as_shipped(recipe, hardware):
    plan = make_plan(_recipe(recipe), hardware)
    assert plan.fits, plan.refusal()
    assert plan.settings["recompute"] == "full" and plan.settings["logprob_chunk_tokens"] == 4096


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_recipes_fit_an_h100_with_full_recompute_and_chunked_logprobs_and_not_without(recipe):
    """The settings the recipes ship decide it: without recompute and with the log-probs of a whole
    40,960-token micro-batch at once, no recipe's trainer fits an 80 GB GPU."""
    cfg = _recipe(recipe)
    # One chunk as large as the micro-batch: the log-probs of all its tokens at once.
    whole = max(cfg.trainer.micro_batch_tokens, cfg.data.max_prompt_tokens + cfg.data.max_response_tokens)
    cfg.trainer.recompute, cfg.trainer.logprob_chunk_tokens = "none", whole
    bare = make_plan(cfg, "h100")
    assert not bare.fits and bare.roles[0].verdict == "does not fit"
    assert "trainer:" in bare.refusal() and "engine:" not in bare.refusal()
    cfg.trainer.recompute, cfg.trainer.logprob_chunk_tokens = "full", 4096
    plan = make_plan(cfg, "h100")
    assert plan.fits, plan.refusal()
    trainer, engine = plan.roles
    assert trainer.total < 0.75 * DEVICE_BYTES["h100"]
    # Each engine holds several full-length (prompt + cutoff) sequences at once.
    assert engine.detail["full_length_sequences"] >= 8
    assert plan.time["rollout_sparse"] < plan.time["rollout_dense"]


def test_14b_terms_add_up_to_the_numbers_in_the_docs():
    """docs/memory_plan.md writes out the 14B recipe's terms; they are these."""
    cfg = _recipe("qwen3_14b_math")
    cfg.trainer.recompute, cfg.trainer.logprob_chunk_tokens = "full", 4096
    plan = make_plan(cfg, "h100")
    trainer = plan.roles[0]
    assert plan.settings | {"dp": 2, "sequence_parallel": True, "micro_batch_tokens": 40960} == plan.settings
    gib = {k: round(v / GIB, 2) for k, v in trainer.terms.items()}
    assert trainer.detail["stage"] == 1  # the last stage: the logits outweigh stage 0's second micro-batch
    assert gib == pytest.approx(
        {
            "weights": 3.44,
            "gradients": 6.88,
            "optimizer": 10.32,
            "activations": 1.95,
            "recompute": 1.84,
            "backward_transient": 0.76,
            "rope_and_buffers": 0.41,
            "head_inputs": 0.2,
            "logits": 2.9,
            "logits_grad": 2.9,
            "logprob_chunk": 2.32,
            "runtime": 3.0,
        },
        abs=0.01,
    )
    text = (REPO / "docs" / "memory_plan.md").read_text()
    assert f"{trainer.total / GIB:.1f} GiB" in text


def test_model_shape_from_config_json_or_by_name(tmp_path):
    cfg = JobConfig()
    cfg.model.name = "Qwen3-8B"
    cfg.model.hf_dir = str(tmp_path)
    assert model_shape(cfg).num_layers == 36  # no config.json: the name
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 4,
                "hidden_size": 256,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 512,
                "vocab_size": 1000,
            }
        )
    )
    assert model_shape(cfg).num_layers == 4  # config.json wins
    cfg.model.name, cfg.model.hf_dir = "my-model", ""
    cfg.model.hf_dir = str(tmp_path / "missing")
    with pytest.raises(UserError, match="field 'model.name': 'my-model' is not a known Qwen3 size"):
        model_shape(cfg)


def test_pipeline_stage_zero_holds_pp_micro_batches_and_the_last_the_logits():
    cfg = _recipe("qwen3_14b_math")
    cfg.trainer.recompute, cfg.trainer.logprob_chunk_tokens = "none", 4096
    plan = make_plan(cfg, "h200")
    trainer = plan.roles[0]
    assert trainer.detail["micro_batches_in_flight"] == 2 and trainer.detail["stage"] == 0
    assert "logits" not in trainer.terms
    stage0, stage1 = trainer.detail["stages_gib"]
    assert stage0 > stage1


def test_engine_pool_cap_and_a_pool_too_small_for_one_sequence():
    cfg = _recipe("qwen3_8b_math")
    cfg.trainer.recompute, cfg.trainer.logprob_chunk_tokens = "full", 4096
    cfg.rollout.kv_pool_tokens = 20_000  # below one 38,024-token request
    plan = make_plan(cfg, "h100")
    engine = plan.roles[1]
    assert engine.detail["kv_pool_tokens"] == 20_000 and engine.verdict == "does not fit"
    assert "cannot hold one 38024-token sequence" in plan.refusal()


def test_unknown_hardware_and_recompute_values_are_user_errors():
    cfg = _recipe("qwen3_8b_math")
    with pytest.raises(UserError, match="--hardware: unknown 'a100'"):
        make_plan(cfg, "a100")
    cfg.trainer.recompute = "sometimes"
    with pytest.raises(UserError, match="field 'trainer.recompute'"):
        make_plan(cfg, "h100")
