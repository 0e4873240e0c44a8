"""pass@k (unbiased) and mean@n by hand, and evaluate() over several named sets, dense and sparse (a
stand-in fleet isolates the scoring; the real fleet runs in tests/loop/test_run.py)."""

from dataclasses import dataclass

import pytest

from sparrow_megatron.loop.evaluate import (
    EvalSpec,
    eval_sampling,
    evaluate,
    pass_at_k,
    reported_ks,
    set_metrics,
)
from sparrow_megatron.loop.tasks import Prompt
from sparrow_megatron.rollout.types import GenerationResult, Sample, SamplingParams
from sparrow_megatron.sparsity.schedule import Schedule


def test_unbiased_pass_at_k_by_hand():
    # n = 4 samples, c = 1 passes, k = 2: of the C(4,2) = 6 pairs, C(3,2) = 3 hold no pass -> 1 - 3/6.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # only the pair of the 2 failures misses
    assert pass_at_k(5, 1, 4) == pytest.approx(1 - 1 / 5)  # C(4,4) / C(5,4)
    assert pass_at_k(5, 2, 4) == 1.0  # any 4 of 5 hold one of 2 passes
    assert pass_at_k(4, 3, 1) == pytest.approx(3 / 4) and pass_at_k(4, 0, 4) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_reported_ks_are_powers_of_two_and_n():
    assert reported_ks(1) == [1] and reported_ks(4) == [1, 2, 4]
    assert reported_ks(6) == [1, 2, 4, 6] and reported_ks(16) == [1, 2, 4, 8, 16]


def test_set_metrics_by_hand():
    rewards = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.5, 1.0, 0.0]]  # passes (reward >= 1): 1 of 4, 2 of 4
    got = set_metrics(rewards)
    assert got == pytest.approx({
        "mean_at_4": (0.25 + 0.625) / 2,
        "pass_at_1": (1 / 4 + 2 / 4) / 2,
        "pass_at_2": (0.5 + 5 / 6) / 2,
        "pass_at_4": 1.0,
    })  # fmt: skip
    assert set_metrics(rewards, pass_reward=0.5)["pass_at_1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert set_metrics([]) == {}


class _Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class _Task:
    """Two eval sets; reward 1 when the response repeats the prompt's answer."""

    def eval_sets(self):
        return {"aime": 2, "math": 3}

    def prompts(self, split, start, count):
        assert split in ("aime", "math", "train")
        return [Prompt(i, f"{split}{i}", example=str(i)) for i in range(start, start + count)]

    def reward(self, prompt, response):
        return 1.0 if response == prompt.example else 0.0


@dataclass
class _Fleet:
    """Dense requests answer right; sparse ones right for prompt 0's first sample only."""

    calls: list

    def generate(self, prompts, sampling, n=1, schedule=None, on_sample=None):
        self.calls.append((len(prompts), n, schedule, sampling.max_new_tokens))
        groups = []
        for i, _ in enumerate(prompts):
            group = []
            for j in range(n):
                right = schedule is None or (i == 0 and j == 0)
                out = [ord(c) for c in (str(i) if right else "x")]
                group.append(Sample(i, j, [], out, [0.0] * len(out), [], [], "stop", 0, 0, None, None, 0.0))
                on_sample(group[-1])
            groups.append(group)
        return GenerationResult(groups)


def test_evaluate_scores_every_set_dense_and_sparse():
    fleet = _Fleet([])
    schedule = Schedule.fixed(64, name="s")
    sampling = eval_sampling(SamplingParams(max_new_tokens=256), seed=0, max_new_tokens=1024)
    out = evaluate(fleet, _Task(), _Tokenizer(), EvalSpec(prompts=0, n=2), sampling, schedule)
    # The whole of each set (prompts=0), dense then sparse, under evaluation's own cutoff.
    assert fleet.calls == [
        (2, 2, None, 1024),
        (2, 2, schedule, 1024),
        (3, 2, None, 1024),
        (3, 2, schedule, 1024),
    ]
    assert out["eval/n"] == 2 and out["eval/aime/prompts"] == 2 and out["eval/math/prompts"] == 3
    for name, prompts in (("aime", 2), ("math", 3)):
        assert out[f"eval/{name}/dense/mean_at_2"] == 1.0 and out[f"eval/{name}/dense/pass_at_2"] == 1.0
        # sparse: prompt 0 passes 1 of 2 (pass@1 1/2, pass@2 1), the others none.
        assert out[f"eval/{name}/sparse/mean_at_2"] == pytest.approx(0.5 / prompts)
        assert out[f"eval/{name}/sparse/pass_at_1"] == pytest.approx(0.5 / prompts)
        assert out[f"eval/{name}/sparse/pass_at_2"] == pytest.approx(1 / prompts)
        assert out[f"eval/{name}/dense/judge_errors"] == 0 and out[f"eval/{name}/dense/tokens_per_s"] == 0.0

    first = evaluate(_Fleet([]), _Task(), _Tokenizer(), EvalSpec(2, 1), SamplingParams(), None)
    assert first["eval/math/prompts"] == 2 and not any("/sparse/" in k for k in first)
    assert eval_sampling(SamplingParams(max_new_tokens=256), 0).max_new_tokens == 256  # 0: the rollout's


def test_a_crashing_judge_scores_0_and_is_counted():
    class Crashy(_Task):
        def reward(self, prompt, response):
            if prompt.index == 1:
                raise ZeroDivisionError("adversarial output")
            return super().reward(prompt, response)

    out = evaluate(
        _Fleet([]), Crashy(), _Tokenizer(), EvalSpec(2, 2), SamplingParams(), None, sets={"aime": 2}
    )
    assert out["eval/aime/dense/judge_errors"] == 2 and out["eval/aime/dense/mean_at_2"] == 0.5
