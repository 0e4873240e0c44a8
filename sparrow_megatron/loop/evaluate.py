"""Periodic evaluation: k samples of each held-out prompt, dense and sparse, scored as mean@k and pass@k.

Dense and sparse rollouts of the same prompts with the same seeds, so the gap between the two rows is
what sparse decoding (and the DistillSparse adapter, which the fleet applies to sparse requests only)
costs in task reward, next to the training reward that only the sparse rollout sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from sparrow_megatron.rollout.types import SamplingParams
from sparrow_megatron.sparsity.schedule import Schedule


@dataclass(frozen=True)
class EvalSpec:
    prompts: int  # held-out prompts, the first `prompts` of the task's eval split
    k: int  # samples per prompt
    pass_reward: float = 1.0  # a sample "passes" when its reward reaches this


def pass_at_k(passed: Sequence[Sequence[bool]]) -> float:
    """Share of prompts with at least one passing sample among their k (n = k: the estimator is exact)."""
    return float(np.mean([any(group) for group in passed])) if passed else 0.0


def mean_at_k(rewards: Sequence[Sequence[float]]) -> float:
    """Mean reward over the k samples of each prompt, averaged over prompts."""
    return float(np.mean([np.mean(group) for group in rewards])) if rewards else 0.0


def evaluate(
    fleet, task, tokenizer, spec: EvalSpec, sampling: SamplingParams, schedule: Schedule | None
) -> dict[str, float]:
    """eval/{dense,sparse}/{mean_at_k,pass_at_k,response_len,tokens_per_s} (sparse only with a schedule)."""
    prompts = task.prompts("eval", 0, spec.prompts)
    ids = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    out = {"eval/k": float(spec.k), "eval/prompts": float(len(prompts))}
    paths = [("dense", None)] + ([("sparse", schedule)] if schedule is not None else [])
    for name, sched in paths:
        batch = fleet.generate(ids, sampling, n=spec.k, schedule=sched)
        rewards = [
            [task.reward(prompts[i], tokenizer.decode(s.output_ids)) for s in group]
            for i, group in enumerate(batch.samples)
        ]
        out[f"eval/{name}/mean_at_k"] = mean_at_k(rewards)
        out[f"eval/{name}/pass_at_k"] = pass_at_k([[r >= spec.pass_reward for r in g] for g in rewards])
        out[f"eval/{name}/response_len"] = float(np.mean([s.response_len for s in batch.flat()]))
        out[f"eval/{name}/tokens_per_s"] = batch.tokens_per_s
    return out


def eval_sampling(sampling: SamplingParams, seed: int) -> SamplingParams:
    """The same draws at every evaluation, so changes between evaluations are the policy's."""
    return replace(sampling, seed=seed * 1_000_003 + 104_729)
