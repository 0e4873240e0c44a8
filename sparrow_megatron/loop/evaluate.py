"""Periodic evaluation: n samples of each prompt of every eval set, dense and sparse, scored as mean@n
and the unbiased pass@k.

Dense and sparse rollouts of the same prompts with the same seeds, so the gap between the two rows is
what sparse decoding (and the DistillSparse adapter, which the fleet applies to sparse requests only)
costs in task reward, next to the training reward that only the sparse rollout sees.

pass@k is the unbiased estimator of Chen et al. (2021) from n >= k samples of which c pass:
1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement from the n hold a pass,
averaged over prompts. It is reported for k = 1, 2, 4, ... (powers of two up to n) and k = n: the
points of a pass@k curve people compare, without n columns for n = 64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from math import comb

import numpy as np

from sparrow_megatron.errors import UserError
from sparrow_megatron.loop.judging import RewardCollector
from sparrow_megatron.rollout.types import SamplingParams
from sparrow_megatron.sparsity.schedule import Schedule


@dataclass(frozen=True)
class EvalSpec:
    prompts: int  # the first `prompts` of each set; 0 = the whole set
    n: int  # samples per prompt
    pass_reward: float = 1.0  # a sample "passes" when its reward reaches this


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c passing samples among n: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def reported_ks(n: int) -> list[int]:
    """The k of pass@k reported for n samples: powers of two up to n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def set_metrics(rewards: Sequence[Sequence[float]], pass_reward: float = 1.0) -> dict[str, float]:
    """mean_at_<n> and pass_at_<k> (reported_ks) of one set: per prompt, then averaged over prompts."""
    if not rewards:
        return {}
    n = len(rewards[0])
    if any(len(group) != n for group in rewards):
        raise ValueError("set_metrics: every prompt needs the same number of samples")
    out = {f"mean_at_{n}": float(np.mean([np.mean(group) for group in rewards]))}
    passed = [sum(r >= pass_reward for r in group) for group in rewards]
    for k in reported_ks(n):
        out[f"pass_at_{k}"] = float(np.mean([pass_at_k(n, c, k) for c in passed]))
    return out


def evaluate(
    fleet,
    task,
    tokenizer,
    spec: EvalSpec,
    sampling: SamplingParams,
    schedule: Schedule | None,
    sets: dict[str, int | None] | None = None,
) -> dict[str, float]:
    """eval/<set>/<dense|sparse>/{mean_at_<n>,pass_at_<k>,response_len,tokens_per_s,judge_errors} for
    every set (`sets`: name -> size, default the task's eval sets; sparse only with a schedule)."""
    sets = task.eval_sets() if sets is None else sets
    out = {"eval/n": float(spec.n)}
    paths = [("dense", None)] + ([("sparse", schedule)] if schedule is not None else [])
    for name, size in sets.items():
        count = spec.prompts or size
        if size is not None:
            count = min(count, size)
        if not count:
            raise UserError(f"evaluation set {name!r}: no prompts to evaluate (set loop.eval_prompts)")
        prompts = task.prompts(name, 0, count)
        ids = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        out[f"eval/{name}/prompts"] = float(len(prompts))
        for path, sched in paths:
            judge = RewardCollector(task, tokenizer, prompts, judge_all=True)  # judged as they complete
            batch = fleet.generate(ids, sampling, n=spec.n, schedule=sched, on_sample=judge.on_sample)
            rewards = judge.rewards(batch.flat(), what=f"eval {name} {path}")
            groups = [rewards[i * spec.n : (i + 1) * spec.n] for i in range(len(prompts))]
            key = f"eval/{name}/{path}"
            out.update({f"{key}/{m}": v for m, v in set_metrics(groups, spec.pass_reward).items()})
            out[f"{key}/response_len"] = float(np.mean([s.response_len for s in batch.flat()]))
            out[f"{key}/tokens_per_s"] = batch.tokens_per_s
            out[f"{key}/judge_errors"] = float(sum(judge.errors.values()))
    return out


def eval_sampling(sampling: SamplingParams, seed: int, max_new_tokens: int = 0) -> SamplingParams:
    """The same draws at every evaluation, so changes between evaluations are the policy's; its own
    generation cutoff when `max_new_tokens` is set (loop.eval_max_response_tokens)."""
    return replace(
        sampling, seed=seed * 1_000_003 + 104_729, max_new_tokens=max_new_tokens or sampling.max_new_tokens
    )
