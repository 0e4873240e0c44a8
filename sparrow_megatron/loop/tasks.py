"""What the loop trains on: prompts for a step and the reward of a response, for each data kind.

A task is a pure function of (split, index), so a resumed run samples exactly the prompts it would have.
"""

from __future__ import annotations

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
    def prompts(self, split: str, start: int, count: int) -> list[Prompt]: ...

    def reward(self, prompt: Prompt, response: str) -> float: ...


class RecallTaskAdapter:
    """The synthetic multi-query recall task of the embedded default."""

    def __init__(self, tokenizer, seed: int, train_size: int = 0):
        from sparrow_megatron.data.recall import RecallTask, RecallTaskConfig

        self.task = RecallTask(RecallTaskConfig(seed=seed))
        self.tokenizer = tokenizer
        self.train_size = train_size

    def prompts(self, split: str, start: int, count: int) -> list[Prompt]:
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


class DatasetTask:
    """Math or code examples from the user's files; the eval split reads data.eval_path."""

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
        for split, path in (("train", cfg.data.train_path), ("eval", cfg.data.eval_path)):
            if not path:
                continue
            examples, report = load(DatasetConfig(path=path, **cfg.data.column_keys()))
            if not examples:
                raise UserError(f"{path}: no usable rows ({report.summary()})")
            refuse = cfg.data.long_prompts == "refuse"
            self.splits[split] = fit_prompts(examples, report, tokenizer, cfg.data.max_prompt_tokens, refuse)
        if self.kind == "code":
            from sparrow_megatron.reward.code_reward import CodeRewardConfig
            from sparrow_megatron.reward.sandbox import SandboxPool, ensure_isolation

            self.code = CodeRewardConfig.from_section(cfg.reward)
            # Refuse here, before the fleet starts, if the machine cannot isolate the programs.
            ensure_isolation(self.code.sandbox)
            self.pool = SandboxPool(self.code.sandbox, workers=cfg.reward.workers or None)

    def prompts(self, split: str, start: int, count: int) -> list[Prompt]:
        examples = self.splits.get(split)
        if not examples:
            raise UserError(f"data: no {split} examples (set data.{split}_path)")
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


def make_task(cfg: JobConfig, tokenizer) -> Task:
    if cfg.data.kind == "synthetic":
        return RecallTaskAdapter(tokenizer, cfg.loop.seed, cfg.data.train_size)
    return DatasetTask(cfg, tokenizer)
