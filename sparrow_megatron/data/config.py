"""The `data` section of the job config: which prompts the loop trains on, and their lengths."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sparrow_megatron.validation import Problems

DataKind = Literal["synthetic", "math", "code"]
# What a dataset column holds: the problem text, the math answer, the code tests, the row id.
ColumnRole = Literal["prompt", "answer", "tests", "id"]
# A dataset prompt longer than max_prompt_tokens: skipped and counted in the load report, or refused.
LongPrompts = Literal["skip", "refuse"]


@dataclass
class DataConfig:
    kind: DataKind = "synthetic"
    train_path: str = ""  # jsonl/parquet for math and code; unused by the synthetic task
    eval_path: str = ""
    # Dataset column -> role, e.g. {"problem": "prompt", "answer": "answer"}; empty = the loader's default.
    columns: dict[str, ColumnRole] = field(default_factory=dict)
    max_prompt_tokens: int = 256
    long_prompts: LongPrompts = "skip"
    max_response_tokens: int = 256  # generation cutoff: 37K in the math recipes, 24K for code
    # Math/code: each epoch of the train file in its own seeded order (loop.seed, epoch); false = file order.
    shuffle: bool = True
    # Synthetic task: cycle through the first N train examples (epochs over a fixed set, like a dataset
    # file); 0 = a fresh example for every prompt.
    train_size: int = 0

    def column_keys(self) -> dict[str, str]:
        """The loader's per-role column names (DatasetConfig's `<role>_key` fields) from `columns`."""
        key = {"prompt": "problem_key", "answer": "answer_key", "tests": "tests_key", "id": "id_key"}
        return {key[role]: column for column, role in self.columns.items()}

    def problems(self, prefix: str = "data.", check_paths: bool = True) -> list[str]:
        p = Problems(prefix)
        p.at_least(1, max_prompt_tokens=self.max_prompt_tokens, max_response_tokens=self.max_response_tokens)
        p.at_least(0, train_size=self.train_size)
        roles = list(self.columns.values())
        for role in sorted({r for r in roles if roles.count(r) > 1}):
            p.need(False, "columns", f"more than one column has the role {role!r}")
        if check_paths:
            if self.kind in ("math", "code"):
                p.need(bool(self.train_path), "train_path", f"is required for data.kind={self.kind!r}")
            for name, value in [("train_path", self.train_path), ("eval_path", self.eval_path)]:
                p.need(not value or Path(value).exists(), name, f"{value} does not exist")
        return p
