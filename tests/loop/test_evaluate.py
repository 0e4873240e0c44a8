"""mean@k / pass@k by hand, and evaluate() routing dense and sparse requests (a stand-in fleet isolates
the scoring; the real fleet runs in tests/loop/test_run.py)."""

from dataclasses import dataclass

import pytest

from sparrow_megatron.loop.evaluate import EvalSpec, evaluate, mean_at_k, pass_at_k
from sparrow_megatron.loop.tasks import Prompt
from sparrow_megatron.rollout.types import GenerationResult, Sample, SamplingParams
from sparrow_megatron.sparsity.schedule import Schedule


def test_mean_and_pass_at_k_by_hand():
    rewards = [[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    assert mean_at_k(rewards) == pytest.approx((0.5 + 0.0) / 2)
    assert pass_at_k([[r >= 1.0 for r in g] for g in rewards]) == 0.5
    assert pass_at_k([[r >= 0.5 for r in g] for g in rewards]) == 0.5
    assert mean_at_k([]) == 0.0 and pass_at_k([]) == 0.0


class _Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class _Task:
    """Reward 1 when the response repeats the prompt's answer."""

    def prompts(self, split, start, count):
        assert split == "eval"
        return [Prompt(i, f"q{i}", example=str(i)) for i in range(start, start + count)]

    def reward(self, prompt, response):
        return 1.0 if response == prompt.example else 0.0


@dataclass
class _Fleet:
    """Dense requests answer right; sparse ones right for prompt 0's first sample only."""

    calls: list

    def generate(self, prompts, sampling, n=1, schedule=None):
        self.calls.append((len(prompts), n, schedule))
        groups = []
        for i, _ in enumerate(prompts):
            group = []
            for j in range(n):
                right = schedule is None or (i == 0 and j == 0)
                out = [ord(c) for c in (str(i) if right else "x")]
                group.append(Sample(i, j, [], out, [0.0] * len(out), [], [], "stop", 0, 0, None, None, 0.0))
            groups.append(group)
        return GenerationResult(groups)


def test_evaluate_scores_dense_and_sparse_paths():
    fleet = _Fleet([])
    schedule = Schedule.fixed(64, name="s")
    out = evaluate(fleet, _Task(), _Tokenizer(), EvalSpec(prompts=2, k=3), SamplingParams(), schedule)
    assert fleet.calls == [(2, 3, None), (2, 3, schedule)]
    assert out["eval/dense/mean_at_k"] == 1.0 and out["eval/dense/pass_at_k"] == 1.0
    assert out["eval/sparse/mean_at_k"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["eval/sparse/pass_at_k"] == 0.5
    assert out["eval/k"] == 3 and out["eval/prompts"] == 2
    assert out["eval/dense/tokens_per_s"] == 0.0  # the stand-in batches report no wall time

    dense_only = evaluate(_Fleet([]), _Task(), _Tokenizer(), EvalSpec(2, 1), SamplingParams(), None)
    assert not any(k.startswith("eval/sparse") for k in dense_only)
