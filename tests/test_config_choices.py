"""Every enumerated config value (each Literal of every job-config section) is accepted by validation
and reaches the code that implements it; anything else is refused at validation, naming the field."""

import dataclasses
import json
import math
import threading
import typing

import pytest
import torch

from sparrow_megatron.config import JobConfig, load_config
from sparrow_megatron.data.recall import TINY_RECALL_DIR
from sparrow_megatron.errors import UserError


def _literal_fields(cls, prefix=""):
    """(dotted field, its Literal values) for every Literal field of the tree, dict values included."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _literal_fields(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is typing.Literal:
            yield prefix + f.name, typing.get_args(tp)
        elif typing.get_origin(tp) is dict and typing.get_origin(typing.get_args(tp)[1]) is typing.Literal:
            yield prefix + f.name, typing.get_args(typing.get_args(tp)[1])


def _reach_kind(cfg, value, tmp_path):
    from sparrow_megatron.data.datasets import load_tokenizer
    from sparrow_megatron.loop.tasks import make_task

    rows = {"math": {"problem": "1 + 1?", "answer": "2"},
            "code": {"problem": "echo", "input_output": {"inputs": ["1\n"], "outputs": ["1\n"]}}}  # fmt: skip
    if value in rows:
        path = tmp_path / f"{value}.jsonl"
        path.write_text(json.dumps(rows[value]) + "\n")
        cfg.data.train_path = str(path)
    task = make_task(cfg, load_tokenizer(TINY_RECALL_DIR))
    assert task.prompts("train", 0, 1)[0].text


def _reach_columns(cfg, value, tmp_path):
    from sparrow_megatron.data.datasets import DatasetConfig

    keys = cfg.data.column_keys()
    assert DatasetConfig(path="x", **keys) and list(keys.values()) == ["col"]


def _reach_long_prompts(cfg, value, tmp_path):
    from sparrow_megatron.data.datasets import load_tokenizer
    from sparrow_megatron.loop.tasks import make_task

    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "x" * 400, "answer": "1"}) + "\n")
    path.write_text(path.read_text() + json.dumps({"problem": "1 + 1?", "answer": "2"}) + "\n")
    cfg.data.kind, cfg.data.train_path, cfg.data.max_prompt_tokens = "math", str(path), 200
    tokenizer = load_tokenizer(TINY_RECALL_DIR)
    if value == "skip":
        assert [p.example.answer for p in make_task(cfg, tokenizer).prompts("train", 0, 2)] == ["2", "2"]
    else:
        with pytest.raises(UserError, match=f"{path}:1: prompt of"):
            make_task(cfg, tokenizer)


def _reach_weight_sync(cfg, value, tmp_path):
    from sparrow_megatron.loop.weight_sync import weight_sync

    class Fleet:  # records which path the sync took
        weight_version = 0
        last_sync_bytes = 0

        def sync_weights(self, buckets):
            self.took = "http"

        def init_distributed_sync(self, spec, stages=1):
            self.spec, self.stages = spec, stages

        def sync_weights_distributed(self, buckets):
            self.took = "distributed"

        def sync_weights_from_disk(self, path):
            self.took = "disk"

    class Policy:
        def iter_hf_weights(self, **kwargs):
            return []

        def export_hf(self, out):
            out.mkdir(parents=True)

    fleet = Fleet()
    weight_sync(cfg, fleet, tmp_path).push(Policy())
    assert fleet.took == value


def _reach_signal(cfg, value, tmp_path):
    from sparrow_megatron.loop.monitor import TailMonitor

    ids = torch.arange(4).repeat(3, 1)
    dense = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, 0.1]] * 3), -1).double()
    tails = TailMonitor(cfg.monitor).observe_topk(1, ids, dense, ids, dense * 1.1, torch.arange(3))
    assert tails.metrics()


def _reach_loss_agg(cfg, value, tmp_path):
    from sparrow_megatron.trainer.grpo import token_weights

    weights = token_weights([3, 1], cfg.grpo.loss_agg, global_tokens=4, global_seqs=2)
    total = float(sum(w.sum() for w in weights))
    assert {"token-mean": 1.0, "seq-mean-token-mean": 1.0, "seq-mean-token-sum": 2.0}[value] == pytest.approx(
        total
    )


def _reach_std(cfg, value, tmp_path):
    from sparrow_megatron.trainer.grpo import group_advantages

    adv = group_advantages([1.0, 0.0], [0, 0], eps=cfg.grpo.adv_eps, std=cfg.grpo.std)
    # Rewards 1, 0: deviations +-1/2; std 1/sqrt(2) dividing by n - 1, 1/2 dividing by n.
    expected = {"unbiased": 0.5 * 2**0.5, "biased": 1.0}[value]
    assert float(adv[0]) == pytest.approx(expected, rel=1e-5)


def _reach_overlong(cfg, value, tmp_path):
    from sparrow_megatron.loop import overlong
    from sparrow_megatron.rollout.types import Sample

    cut = Sample(0, 0, [1], [2] * cfg.data.max_response_tokens, [], [], [], "length", 0, 0, None, None, 0.0)
    rewards = overlong.shaped_rewards(cfg.grpo, cfg.data.max_response_tokens, [cut], [1.0])
    masks = overlong.loss_masks(cfg.grpo, [cut])
    assert rewards == [{"none": 1.0, "mask": 1.0, "penalty": 0.0}[value]]
    assert (masks is not None and not any(masks[0])) == (value == "mask")


def _reach_lr_schedule(cfg, value, tmp_path):
    from sparrow_megatron.trainer.optim import lr_at

    cfg.trainer.lr, cfg.trainer.min_lr = 1e-3, 1e-4
    lrs = [lr_at(cfg.trainer, s, total_steps=10) for s in range(11)]
    assert all(math.isfinite(x) for x in lrs) and lrs[0] == 1e-3
    assert lrs[-1] == pytest.approx(1e-3 if value == "constant" else 1e-4)
    if value == "linear":
        assert lrs[5] == pytest.approx(5.5e-4)


def _reach_dtype(cfg, value, tmp_path):
    from sparrow_megatron.trainer.policy import Policy

    policy = Policy(cfg.trainer, cfg.grpo, model_dir=TINY_RECALL_DIR)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[value]
    assert next(policy.model.module.parameters()).dtype == want


def _megatron_config(trainer):
    from sparrow_megatron.trainer.model import LongContext, read_qwen3_config, transformer_config

    arch = read_qwen3_config(TINY_RECALL_DIR)
    return transformer_config(arch, 1, 1, LongContext.of(trainer), torch.float32)


def _reach_recompute(cfg, value, tmp_path):
    config = _megatron_config(cfg.trainer)
    assert config.recompute_granularity == {"none": None, "selective": "selective", "full": "full"}[value]


def _reach_recompute_method(cfg, value, tmp_path):
    cfg.trainer.recompute = "full"  # the method applies to full recompute
    config = _megatron_config(cfg.trainer)
    assert (config.recompute_granularity, config.recompute_method) == ("full", value)


def _reach_budget_mode(cfg, value, tmp_path):
    from sparrow_megatron.sparsity.schedule import Schedule
    from sparrow_megatron.trainer.distill import training_schedule

    growing = Schedule(budgets=(None, 1024, 2048), bin_width=4096)
    got = training_schedule(growing, cfg.distill.budget_mode, cfg.distill.fixed_budget)
    assert got.budgets == {"replay": (None, 1024, 2048), "fixed": (2048,)}[value]


def _reach_isolation(cfg, value, tmp_path):
    from sparrow_megatron.reward.code_reward import CodeRewardConfig, code_reward, parse_tests
    from sparrow_megatron.reward.sandbox import isolation_available

    code = CodeRewardConfig.from_section(cfg.reward)
    assert code.sandbox.isolation == value
    assert cfg.reward.mlflow_tags()["reward.isolation"] == value
    if value == "bwrap" and not isolation_available(code.sandbox):
        pytest.skip("this machine cannot isolate programs (sparrow reward code --check)")
    tests = parse_tests({"inputs": ["3\n"], "outputs": ["6\n"]})
    assert code_reward("```python\nprint(2 * int(input()))\n```", tests, code).reward == 1.0


def _reach_executor(cfg, value, tmp_path):
    from sparrow_megatron.launch.job import launch_spec

    assert launch_spec(cfg, "recipe.yaml", []).executor == value


def _reach_overlap(cfg, value, tmp_path):
    from sparrow_megatron.loop.overlap import RolloutSide

    side = RolloutSide(cfg.loop.overlap, cfg, None, None, None, None, last_step=3)
    side._generate = lambda step, schedule: f"batch {step} from {threading.current_thread().name}"
    side.prefetch(2, None)  # one_step: step 2's batch is generated in the background, now
    side.join()
    assert side._pending == {"none": None, "one_step": "batch 2 from rollout-step-2"}[value]


REACH = {
    "data.kind": _reach_kind,
    "data.columns": _reach_columns,
    "data.long_prompts": _reach_long_prompts,
    "rollout.weight_sync": _reach_weight_sync,
    "reward.isolation": _reach_isolation,
    "monitor.signal": _reach_signal,
    "grpo.loss_agg": _reach_loss_agg,
    "grpo.std": _reach_std,
    "grpo.overlong": _reach_overlong,
    "trainer.lr_schedule": _reach_lr_schedule,
    "trainer.dtype": _reach_dtype,
    "trainer.recompute": _reach_recompute,
    "trainer.recompute_method": _reach_recompute_method,
    "distill.budget_mode": _reach_budget_mode,
    "cluster.executor": _reach_executor,
    "loop.overlap": _reach_overlap,
}
CASES = [(name, value) for name, values in _literal_fields(JobConfig) for value in values]
# Slurm needs its own rollout node; the rest of the defaults hold for every value.
BASE = ["cluster.nodes=2", "cluster.rollout_nodes=1"]


def test_every_enumerated_field_has_a_check_here():
    assert {name for name, _ in CASES} == set(REACH)


@pytest.mark.parametrize("name, value", CASES)
def test_each_value_is_accepted_and_reaches_its_component(name, value, tmp_path):
    override = f"{name}={{col: {value}}}" if name == "data.columns" else f"{name}={value}"
    cfg = load_config(None, [*BASE, override], check_paths=False)
    REACH[name](cfg, value, tmp_path)


@pytest.mark.parametrize("name", sorted(REACH))
def test_any_other_value_is_refused_naming_the_field(name):
    override = f"{name}={{col: bogus}}" if name == "data.columns" else f"{name}=bogus"
    with pytest.raises(UserError, match=f"field '{name}"):
        load_config(None, [override])
