"""DAPO dynamic sampling (grpo.dynamic_sampling): fill the step's batch with groups that carry signal.

A GRPO group whose rewards are all equal (all right, all wrong) has advantage 0 on every sample: it costs
a rollout and an update slot and teaches nothing. With dynamic sampling such groups are dropped and more
prompts are rolled out until loop.prompts_per_step groups with signal are kept, at most
grpo.max_sampling_rounds rollouts per step; groups beyond the batch are discarded (as DAPO does).

The prompts stay a pure function of the run: step s owns the window of max_sampling_rounds *
prompts_per_step prompts starting at (s - 1) * max_sampling_rounds * prompts_per_step, and round r
rolls out its r-th slice, as `collect` would for the "virtual step" (s - 1) * rounds + r + 1 (which also
gives each round its own sampling seed). A resumed run therefore draws exactly the prompts and tokens of
an uninterrupted one, with no cursor in the loop state; the price is that prompts of rounds a step did
not need are skipped, so the dataset is walked max_sampling_rounds times faster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from sparrow_megatron.loop import overlong
from sparrow_megatron.loop.collect import Collected, collect

log = logging.getLogger("sparrow.loop")


@dataclass
class Filled(Collected):
    rounds: int = 1  # rollouts this step took
    dropped_groups: int = 0  # groups with all-equal rewards left out
    seen_groups: int = 0  # groups rolled out in all

    def metrics(self) -> dict[str, float]:
        return {
            **super().metrics(),
            "rollout/sampling_rounds": float(self.rounds),
            "rollout/dropped_groups": float(self.dropped_groups),
            # The drop rate: how much of the rollout dynamic sampling threw away.
            "rollout/dropped_group_frac": self.dropped_groups / max(self.seen_groups, 1),
        }


def collect_filled(
    step: int, cfg, task, tokenizer, fleet, sampling, schedule, collect_fn=collect
) -> Collected:
    """`collect` for this step; with grpo.dynamic_sampling, rounds of it until the batch holds
    loop.prompts_per_step groups whose (shaped) rewards differ. collect_fn: `collect` (tests inject)."""
    g = cfg.grpo
    if not g.dynamic_sampling:
        return collect_fn(step, cfg, task, tokenizer, fleet, sampling, schedule)
    want, rounds = cfg.loop.prompts_per_step, g.max_sampling_rounds
    keep: set = set()  # ids of the groups kept, at most `want`
    parts: list[tuple] = []  # (sample, reward, group id) of the kept groups' samples, in arrival order
    dropped = judge_errors = dropped_groups = seen = 0
    tokens = seconds = 0.0
    last = None
    for r in range(rounds):
        got = collect_fn((step - 1) * rounds + r + 1, cfg, task, tokenizer, fleet, sampling, schedule)
        last = got
        dropped += got.dropped
        judge_errors += got.judge_errors
        n_tok = sum(s.response_len for s in got.samples)
        tokens += n_tok
        seconds += n_tok / got.tokens_per_s if got.tokens_per_s > 0 else 0.0
        shaped = overlong.shaped_rewards(g, cfg.data.max_response_tokens, got.samples, got.rewards)
        members: dict[int, list[int]] = {}
        for i, gid in enumerate(got.group_ids):
            members.setdefault(gid, []).append(i)
        for gid, idx in members.items():
            seen += 1
            # Equal rewards, or a lone sample: advantage 0 for all, no signal (group_advantages).
            if len(idx) < 2 or np.ptp([shaped[i] for i in idx]) == 0:
                dropped_groups += 1
                continue
            if len(keep) < want:
                keep.add(gid)
                parts.extend((got.samples[i], got.rewards[i], gid) for i in idx)
        if len(keep) >= want:
            break
    used = r + 1
    if not parts:
        # Nothing carried signal in any round: train on the last round as it is (zero advantages, a
        # no-op update) so the step still scores, monitors tails and syncs like any other.
        log.warning("step %d: no group with differing rewards in %d sampling rounds", step, used)
        parts = list(zip(last.samples, last.rewards, last.group_ids, strict=True))
    elif len(keep) < want:
        log.warning(
            "step %d: %d of %d groups with signal after %d sampling rounds", step, len(keep), want, used
        )
    samples, rewards, group_ids = (list(x) for x in zip(*parts, strict=True)) if parts else ([], [], [])
    return Filled(
        samples, rewards, group_ids, dropped, judge_errors, tokens / seconds if seconds > 0 else 0.0,
        rounds=used, dropped_groups=dropped_groups, seen_groups=seen,
    )  # fmt: skip
