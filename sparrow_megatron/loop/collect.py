"""The first half of an RL step: prompts -> sparse rollout (fleet) -> rewards, as one typed record.

What the trainer side needs from the rollout side is `Collected`: the usable samples, their rewards and
GRPO group ids, and the counts the step logs. Keeping it in one place lets the rollout half change how it
fills a batch (reward pools, dynamic sampling, one-step-off overlap) without touching the update half.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from sparrow_megatron.loop.judging import RewardCollector, is_usable
from sparrow_megatron.reward.judge_pool import JUDGE_ERROR_REASONS
from sparrow_megatron.rollout.types import Sample, SamplingParams

log = logging.getLogger("sparrow.loop")


@dataclass
class Collected:
    samples: list[Sample]  # usable samples: a response and finite log-probs
    rewards: list[float]  # one per sample
    group_ids: list[int]  # GRPO group of each sample: the prompt's running index
    dropped: int  # samples left out (no response, non-finite log-probs)
    judge_errors: int  # failed judgements on this batch (each scored 0)
    tokens_per_s: float  # the fleet's generation throughput on this batch
    # Failed judgements by reason (reward/judge_pool.py's JUDGE_ERROR_REASONS), and the seconds spent
    # waiting for rewards after the last sample completed (judging overlaps generation).
    judge_error_reasons: dict[str, int] = field(default_factory=dict)
    reward_wait_s: float = 0.0
    stale_samples: int = 0  # samples served at a weight version other than the fleet's (logged by it)

    def metrics(self) -> dict[str, float]:
        samples, rewards = self.samples, self.rewards
        return {
            "reward/mean": float(np.mean(rewards)) if rewards else 0.0,
            # Judgements that failed on this step (each scored 0): timeouts, crashed or dead judges.
            "reward/judge_errors": float(self.judge_errors),
            **{
                f"reward/judge_errors/{r}": float(self.judge_error_reasons.get(r, 0))
                for r in JUDGE_ERROR_REASONS
            },
            "time/reward_s": self.reward_wait_s,
            "rollout/response_len": float(np.mean([s.response_len for s in samples])) if samples else 0.0,
            "rollout/tokens_per_s": self.tokens_per_s,
            "rollout/dropped_samples": float(self.dropped),
            "rollout/stale_samples": float(self.stale_samples),
            # What the engines report having served this batch with (the previous step's sync).
            "rollout/engine_weight_version": (
                float(min(s.weight_version for s in samples)) if samples else -1.0
            ),
        }


def usable(samples: list[Sample]) -> tuple[list[Sample], int]:
    """Samples the update can use: a response, finite log-probs. The others are counted and logged."""
    keep = [s for s in samples if is_usable(s)]
    return keep, len(samples) - len(keep)


def collect(step: int, cfg, task, tokenizer, fleet, sampling: SamplingParams, schedule) -> Collected:
    """Roll out this step's prompts (rollout.n_samples each, under `schedule`) and score them."""
    prompts = task.prompts("train", (step - 1) * cfg.loop.prompts_per_step, cfg.loop.prompts_per_step)
    prompt_ids = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    judge = RewardCollector(task, tokenizer, prompts)  # judges each sample as it completes
    rollout = fleet.generate(prompt_ids, seeded(sampling, cfg.loop.seed, step), n=cfg.rollout.n_samples,
                             schedule=schedule, on_sample=judge.on_sample)  # fmt: skip
    samples, dropped = usable(rollout.flat())
    if dropped:
        log.warning("step %d: %d samples without a usable response left out of the update", step, dropped)
    rewards = judge.rewards(samples, what=f"step {step}")
    group_ids = [prompts[s.prompt_index].index for s in samples]
    errors = dict(judge.errors)
    return Collected(samples, rewards, group_ids, dropped, sum(errors.values()), rollout.tokens_per_s,
                     errors, judge.wait_s, rollout.stale_samples)  # fmt: skip


def seeded(sampling: SamplingParams, seed: int, step: int) -> SamplingParams:
    """Per-step sampling seed: a resumed run draws the same tokens as an uninterrupted one."""
    return replace(sampling, seed=seed * 1_000_003 + step * 7919)
