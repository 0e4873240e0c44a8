"""What the loop trains on: prompts for a step and the reward of a response, for each data kind.

A task is a pure function of (split, index), so a resumed run samples exactly the prompts it would have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

from sparrow_megatron.config import JobConfig
from sparrow_megatron.errors import UserError


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the task's split: the group id of its samples
    text: str  # chat-formatted, ending with the assistant header
    example: Any  # what the reward needs (the answer, the tests)


class Task(Protocol):
    def prompts(self, split: str, start: int, count: int) -> list[Prompt]: ...  # "train" or an eval set

    def eval_sets(self) -> dict[str, int | None]: ...  # eval set name -> prompts (None: generated)

    def reward(self, prompt: Prompt, response: str) -> float: ...

    def close(self) -> None: ...

    # Optional: `submit_reward(prompt, response) -> Future[Judgement]`, judging in the task's own pools
    # (see loop/judging.py); without it the loop calls reward() inline.


def recall_config(seed: int, haystack: tuple[int, int]):
    """The recall task's config for data.haystack = [min, max] (min == max: a fixed length)."""
    from sparrow_megatron.data.recall import RecallTaskConfig

    lo, hi = haystack
    return RecallTaskConfig(haystack_len=hi, min_haystack_len=lo if lo < hi else 0, seed=seed)


class RecallTaskAdapter:
    """The synthetic multi-query recall task of the embedded default."""

    def __init__(self, tokenizer, seed: int, train_size: int = 0, haystack: tuple[int, int] = (1100, 1100)):
        from sparrow_megatron.data.recall import RecallTask

        self.task = RecallTask(recall_config(seed, haystack))
        self.tokenizer = tokenizer
        self.train_size = train_size

    EVAL_SET = "recall"  # the task's own eval split, the embedded default's one evaluation set

    def eval_sets(self) -> dict[str, int | None]:
        return {self.EVAL_SET: None}

    def prompts(self, split: str, start: int, count: int) -> list[Prompt]:
        split = "eval" if split == self.EVAL_SET else split

        def example(i: int):
            cycle = self.train_size if split == "train" else 0
            return self.task.example(split, i % cycle if cycle else i)

        # Prompt.index stays the running index: the group id of its samples, unique within a step.
        return [
            Prompt(i, ex.prompt_text(self.tokenizer), ex)
            for i, ex in ((i, example(i)) for i in range(start, start + count))
        ]

    def reward(self, prompt: Prompt, response: str) -> float:
        from sparrow_megatron.data.recall import recall_reward

        return recall_reward(response, prompt.example).reward

    def close(self) -> None:
        pass  # judged inline: a string comparison per sample


class DatasetTask:
    """Math or code examples from the user's files: the "train" split, and one split per eval set."""

    def __init__(self, cfg: JobConfig, tokenizer):
        from sparrow_megatron.data.datasets import (
            DatasetConfig,
            fit_prompts,
            load_code_dataset,
            load_math_dataset,
        )

        self.kind = cfg.data.kind
        self.tokenizer = tokenizer
        self.shuffle, self.seed = cfg.data.shuffle, cfg.loop.seed
        self._orders: dict[int, list[int]] = {}
        load = load_math_dataset if self.kind == "math" else load_code_dataset
        self.splits: dict[str, list] = {}
        for split, path in {"train": cfg.data.train_path, **cfg.data.eval_sets()}.items():
            if not path:
                continue
            examples, report = load(DatasetConfig(path=path, **cfg.data.column_keys()))
            if not examples:
                raise UserError(f"{path}: no usable rows ({report.summary()})")
            refuse = cfg.data.long_prompts == "refuse"
            self.splits[split] = fit_prompts(examples, report, tokenizer, cfg.data.max_prompt_tokens, refuse)
        workers = cfg.reward.workers or max(1, (os.cpu_count() or 2) // 2)
        if self.kind == "code":
            from sparrow_megatron.reward.code_reward import CodeRewardConfig
            from sparrow_megatron.reward.judge_pool import ThreadJudgePool
            from sparrow_megatron.reward.sandbox import IsolationUnavailable, SandboxPool, ensure_isolation

            self.code = CodeRewardConfig.from_section(cfg.reward)
            # Refuse here, before the fleet starts, if the machine cannot isolate the programs.
            ensure_isolation(self.code.sandbox)
            self.pool = SandboxPool(self.code.sandbox, workers=workers)
            # A thread per response waits on its cases; the sandbox pool bounds the programs running
            # (all-or-nothing runs a response's cases one after another in its thread: as many threads).
            self.judges = ThreadJudgePool(workers if self.code.all_or_nothing else 4 * workers,
                                          fatal=(IsolationUnavailable,))  # fmt: skip
        else:
            from sparrow_megatron.reward.judge_pool import ProcessJudgePool

            self.judges = ProcessJudgePool(workers, cfg.reward.judge_timeout_s,
                                           preload=("sparrow_megatron.reward.math_reward", "math_verify"))  # fmt: skip

    def eval_sets(self) -> dict[str, int | None]:
        return {name: len(examples) for name, examples in self.splits.items() if name != "train"}

    def prompts(self, split: str, start: int, count: int) -> list[Prompt]:
        examples = self.splits.get(split)
        if not examples:
            where = "data.train_path" if split == "train" else f"data.eval (sets: {sorted(self.eval_sets())})"
            raise UserError(f"data: no {split!r} examples (set {where})")
        picked = [(i, examples[self._row(split, i, len(examples))]) for i in range(start, start + count)]
        return [Prompt(i, ex.prompt_text(self.tokenizer), ex) for i, ex in picked]

    def _row(self, split: str, i: int, n: int) -> int:
        """Row of the i-th prompt: epochs over the file, each train epoch in a permutation seeded by
        (loop.seed, epoch), so the order is a pure function of i and a resumed run draws the same rows."""
        if split != "train" or not self.shuffle:
            return i % n
        import numpy as np

        epoch = i // n
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n).tolist()}
        return self._orders[epoch][i % n]

    def reward(self, prompt: Prompt, response: str) -> float:
        if self.kind == "math":
            from sparrow_megatron.reward.math_reward import math_reward

            return float(math_reward(response, prompt.example.answer).reward)
        from sparrow_megatron.reward.code_reward import code_reward

        return float(code_reward(response, prompt.example.tests, self.code, self.pool).reward)

    def submit_reward(self, prompt: Prompt, response: str):
        """The reward as a Future[Judgement] from the task's judge pool (kept across steps)."""
        if self.kind == "math":
            from sparrow_megatron.reward.math_reward import math_reward_value

            return self.judges.submit(math_reward_value, response, str(prompt.example.answer))
        return self.judges.submit(_judged_code, response, prompt.example.tests, self.code, self.pool)

    def close(self) -> None:
        """Stop the judge pools (the loop's end)."""
        self.judges.close()
        if self.kind == "code":
            self.pool.close()


class JudgeFailed(RuntimeError):
    """A code judgement in which the judge itself failed on a case: the response scores 0."""


def _judged_code(response: str, tests, config, pool) -> float:
    from sparrow_megatron.reward.code_reward import code_reward

    score = code_reward(response, tests, config, pool)
    if score.reason == "judge_error":
        raise JudgeFailed(next(c.detail for c in score.cases if c.status == "judge_error"))
    return score.reward


def make_task(cfg: JobConfig, tokenizer) -> Task:
    if cfg.data.kind == "synthetic":
        return RecallTaskAdapter(tokenizer, cfg.loop.seed, cfg.data.train_size, tuple(cfg.data.haystack))
    return DatasetTask(cfg, tokenizer)
