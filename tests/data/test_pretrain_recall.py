"""The committed tiny recall checkpoint and the script that makes it."""

import json

import pytest

from sparrow_megatron.data.pretrain_recall import RECALL_SHAPE, PretrainConfig, greedy_rewards, pretrain
from sparrow_megatron.data.recall import TINY_RECALL_DIR, RecallTask, RecallTaskConfig

pytestmark = pytest.mark.timeout(600)


def _load(path):
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = Qwen3ForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return model, tokenizer


def test_committed_checkpoint_has_partial_dense_accuracy():
    record = json.loads((TINY_RECALL_DIR / "recall_pretrain.json").read_text())
    assert (TINY_RECALL_DIR / "model.safetensors").stat().st_size < 20 * 2**20
    model, tokenizer = _load(TINY_RECALL_DIR)
    assert model.config.num_hidden_layers == RECALL_SHAPE.num_hidden_layers >= 4
    assert tokenizer.chat_template
    task = RecallTask(RecallTaskConfig(**record["task"]))
    # Partial: RL has room to improve it, and it has learned something (chance is 1/26 per value).
    assert 0.1 < record["dense_greedy_accuracy"] < 0.9
    count = 16
    rewards = greedy_rewards(model, tokenizer, task, count)
    agree = sum(a == b for a, b in zip(rewards, record["eval_rewards"][:count], strict=True))
    assert agree >= count - 2  # same greedy answers up to float near-ties on another machine


def test_pretrain_script_writes_a_loadable_checkpoint(tmp_path):
    cfg = PretrainConfig(steps=2, batch_size=2, eval_examples=2, max_len=32)
    report = pretrain(tmp_path, cfg, RecallTaskConfig(haystack_len=64))
    assert report["steps_done"] == 2
    assert len(report["eval_rewards"]) == 2
    written = json.loads((tmp_path / "recall_pretrain.json").read_text())
    assert written["dense_greedy_accuracy"] == report["dense_greedy_accuracy"]
    model, tokenizer = _load(tmp_path)
    assert model.config.hidden_size == RECALL_SHAPE.hidden_size
    assert tokenizer.eos_token == "<|im_end|>"
