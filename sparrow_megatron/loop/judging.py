"""Rewards of a batch, judged as its samples complete: submitted from the fleet's `on_sample` callback,
gathered after the last sample (the wait then is `time/reward_s`).

A task with `submit_reward(prompt, response) -> Future[Judgement]` judges in its own pools (math in
processes with a hard timeout, code in sandboxes); one with only `reward()` (the synthetic task, a
stand-in) is scored inline. Either way a failed judgement is a 0 with a counted reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future

import numpy as np

from sparrow_megatron.reward.judge_pool import CRASHED, JUDGE_ERROR_REASONS, Judgement
from sparrow_megatron.rollout.types import Sample

log = logging.getLogger("sparrow.loop")


def is_usable(sample: Sample) -> bool:
    """A response with finite log-probs: what the update can use (and so what is worth judging)."""
    return bool(sample.output_ids) and bool(np.isfinite(sample.logprobs).all())


def submit(task, prompt, response: str) -> Future[Judgement]:
    judge = getattr(task, "submit_reward", None)
    if judge is not None:
        return judge(prompt, response)
    done: Future[Judgement] = Future()
    try:
        done.set_result(Judgement(float(task.reward(prompt, response))))
    except Exception as err:  # noqa: BLE001 - no model output may stop the step
        done.set_result(Judgement.failed(CRASHED, f"{type(err).__name__}: {err}"))
    return done


class RewardCollector:
    """Pass `on_sample` to fleet.generate; then `rewards(samples)` in the samples' order."""

    def __init__(self, task, tokenizer, prompts, judge_all: bool = False):
        self.task, self.tokenizer, self.prompts = task, tokenizer, prompts
        self.judge_all = judge_all  # evaluation scores every sample; training only the usable ones
        self._futures: dict[tuple[int, int], Future[Judgement]] = {}
        self._lock = threading.Lock()
        self.errors: Counter[str] = Counter()
        self.wait_s = 0.0

    def on_sample(self, sample: Sample) -> None:
        if not (self.judge_all or is_usable(sample)):
            return
        future = submit(
            self.task, self.prompts[sample.prompt_index], self.tokenizer.decode(sample.output_ids)
        )
        with self._lock:
            self._futures[(sample.prompt_index, sample.sample_index)] = future

    def rewards(self, samples: list[Sample], what: str = "batch") -> list[float]:
        """Each sample's reward (0 for a failed judgement, counted in `errors` and logged once)."""
        t0 = time.perf_counter()
        for s in samples:  # a sample the callback never saw (a stand-in fleet without on_sample)
            if (s.prompt_index, s.sample_index) not in self._futures:
                self.on_sample(s)
        judged = [self._futures[(s.prompt_index, s.sample_index)].result() for s in samples]
        self.wait_s = time.perf_counter() - t0
        failed = [(s, j) for s, j in zip(samples, judged, strict=True) if j.error]
        self.errors.update(j.error for _, j in failed)
        if failed:
            s, j = failed[0]
            counts = ", ".join(f"{r} {n}" for r, n in sorted(self.errors.items()))
            log.warning(
                "%s: %d judgements failed and scored 0 (%s); first: prompt %d sample %d: %s: %s",
                what, len(failed), counts, s.prompt_index, s.sample_index, j.error, j.detail,
            )  # fmt: skip
        return [j.reward for j in judged]

    def metrics(self) -> dict[str, float]:
        out = {"reward/judge_errors": float(sum(self.errors.values()))}
        out.update({f"reward/judge_errors/{r}": float(self.errors[r]) for r in JUDGE_ERROR_REASONS})
        return out
