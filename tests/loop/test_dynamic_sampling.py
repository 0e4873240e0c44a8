"""grpo.dynamic_sampling: groups with all-equal rewards are dropped and further prompts rolled out."""

import pytest

from sparrow_megatron.config import JobConfig, apply_overrides
from sparrow_megatron.loop.collect import Collected
from sparrow_megatron.loop.dynamic_sampling import collect_filled
from sparrow_megatron.rollout.types import Sample


def _sample(prompt: int, n: int = 4) -> Sample:
    return Sample(prompt, 0, [1], [2] * n, [-1.0] * n, [], [], "stop", 0, 0, None, None, 0.0)


class FakeRollout:
    """collect() for the window of a (virtual) step: prompt i has 2 samples; its rewards differ only
    when i % 3 == 0, so two of every three groups are degenerate."""

    def __init__(self, pps: int):
        self.pps, self.calls = pps, []

    def __call__(self, step, cfg, task, tokenizer, fleet, sampling, schedule):
        self.calls.append(step)
        start = (step - 1) * self.pps
        samples, rewards, groups = [], [], []
        for i in range(start, start + self.pps):
            samples += [_sample(i), _sample(i)]
            rewards += [1.0, 0.0] if i % 3 == 0 else [1.0, 1.0]
            groups += [i, i]
        return Collected(samples, rewards, groups, dropped=1, judge_errors=0, tokens_per_s=100.0)


def _cfg(*extra):
    return apply_overrides(JobConfig(), ["loop.prompts_per_step=4", "grpo.dynamic_sampling=true", *extra])


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_signal():
    cfg = _cfg("grpo.max_sampling_rounds=4")
    fake = FakeRollout(4)
    got = collect_filled(2, cfg, None, None, None, None, None, collect_fn=fake)
    # Step 2 owns the window of virtual steps 5..8 (prompts 16..31); prompts 18, 21, 24, 27 carry
    # signal, so three rounds fill the batch.
    assert fake.calls == [5, 6, 7]
    assert sorted(set(got.group_ids)) == [18, 21, 24, 27]
    assert len(got.samples) == 8
    for gid in set(got.group_ids):
        assert len({r for r, g in zip(got.rewards, got.group_ids, strict=True) if g == gid}) == 2
    m = got.metrics()
    assert m["rollout/sampling_rounds"] == 3
    assert m["rollout/dropped_groups"] == 8  # of the 12 groups seen
    assert m["rollout/dropped_group_frac"] == pytest.approx(8 / 12)
    assert m["rollout/dropped_samples"] == 3  # each round's unusable samples add up
    assert m["rollout/tokens_per_s"] == pytest.approx(100.0)
    # The same step reads the same window again: a resumed run reproduces it.
    again = collect_filled(2, cfg, None, None, None, None, None, collect_fn=FakeRollout(4))
    assert again.group_ids == got.group_ids


def test_rounds_are_bounded_and_the_batch_may_stay_short():
    fake = FakeRollout(4)
    got = collect_filled(1, _cfg("grpo.max_sampling_rounds=2"), None, None, None, None, None, collect_fn=fake)
    assert fake.calls == [1, 2]
    assert sorted(set(got.group_ids)) == [0, 3, 6]  # 3 of the 4 wanted
    assert got.metrics()["rollout/sampling_rounds"] == 2


def test_off_is_one_plain_collect():
    fake = FakeRollout(4)
    cfg = apply_overrides(JobConfig(), ["loop.prompts_per_step=4"])
    got = collect_filled(3, cfg, None, None, None, None, None, collect_fn=fake)
    assert fake.calls == [3] and len(got.samples) == 8 and "rollout/sampling_rounds" not in got.metrics()


def test_a_step_without_any_signal_trains_on_its_last_round():
    class Flat(FakeRollout):
        def __call__(self, *a):
            got = super().__call__(*a)
            got.rewards = [0.0] * len(got.rewards)
            return got

    fake = Flat(4)
    got = collect_filled(1, _cfg("grpo.max_sampling_rounds=3"), None, None, None, None, None, collect_fn=fake)
    assert fake.calls == [1, 2, 3] and sorted(set(got.group_ids)) == [8, 9, 10, 11]
    assert got.metrics()["rollout/dropped_groups"] == 12
