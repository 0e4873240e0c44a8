"""The `data` section of the job config: which prompts the loop trains on, and their lengths."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sparrow_megatron.validation import Problems

DataKind = Literal["synthetic", "math", "code"]
# What a dataset column holds: the problem text, the math answer, the code tests, the row id.
ColumnRole = Literal["prompt", "answer", "tests", "id"]
EVAL_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# A dataset prompt longer than max_prompt_tokens: skipped and counted in the load report, or refused.
LongPrompts = Literal["skip", "refuse"]


@dataclass
class DataConfig:
    kind: DataKind = "synthetic"
    train_path: str = ""  # jsonl/parquet for math and code; unused by the synthetic task
    # Named evaluation sets, each scored on its own: {aime24: aime24.parquet, math500: math500.jsonl}.
    eval: dict[str, str] = field(default_factory=dict)
    eval_path: str = ""  # one evaluation set, named after its file (aime24.jsonl -> aime24)
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
    # Synthetic task: the haystack length range [min, max] in characters (= tokens with the tiny char
    # tokenizer); each prompt draws its own. A range spreads decode positions over several monitor bins.
    haystack: list[int] = field(default_factory=lambda: [1100, 1100])

    def column_keys(self) -> dict[str, str]:
        """The loader's per-role column names (DatasetConfig's `<role>_key` fields) from `columns`."""
        key = {"prompt": "problem_key", "answer": "answer_key", "tests": "tests_key", "id": "id_key"}
        return {key[role]: column for column, role in self.columns.items()}

    def eval_sets(self) -> dict[str, str]:
        """Evaluation set name -> file: `eval`, and `eval_path` under its file's name."""
        sets = dict(self.eval)
        if self.eval_path:
            sets.setdefault(Path(self.eval_path).stem, self.eval_path)
        return sets

    def problems(self, prefix: str = "data.", check_paths: bool = True) -> list[str]:
        p = Problems(prefix)
        p.at_least(1, max_prompt_tokens=self.max_prompt_tokens, max_response_tokens=self.max_response_tokens)
        p.at_least(0, train_size=self.train_size)
        h = self.haystack
        p.need(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, int) for x in h)
            and 3 <= h[0] <= h[1],
            "haystack",
            f"must be [min, max] characters with 3 <= min <= max (3 needles), got {h}",
        )  # fmt: skip
        roles = list(self.columns.values())
        for role in sorted({r for r in roles if roles.count(r) > 1}):
            p.need(False, "columns", f"more than one column has the role {role!r}")
        for name in self.eval:
            # The name is part of metric names (eval/<name>/dense/pass_at_1) and "train" is the train split.
            p.need(bool(EVAL_SET_NAME.fullmatch(name)) and name != "train", "eval",
                   f"set name {name!r}: use letters, digits, '_', '-' or '.', and not 'train'")  # fmt: skip
        if self.eval_path:
            stem = Path(self.eval_path).stem
            p.need(stem not in self.eval or self.eval[stem] == self.eval_path, "eval_path",
                   f"its set name {stem!r} (the file's name) is also a data.eval set: list it there only")  # fmt: skip
            p.need(bool(EVAL_SET_NAME.fullmatch(stem)) and stem != "train", "eval_path",
                   f"the file's name {stem!r} names its set: rename it, or list it in data.eval as {{name: path}}")  # fmt: skip
        if self.kind == "synthetic":
            p.need(not self.eval_sets(), "eval", "the synthetic task evaluates on its own eval split; "
                   "data.eval and data.eval_path are for data.kind=math or code")  # fmt: skip
        if check_paths:
            if self.kind in ("math", "code"):
                p.need(bool(self.train_path), "train_path", f"is required for data.kind={self.kind!r}")
            for name, value in [("train_path", self.train_path), ("eval_path", self.eval_path)]:
                p.need(not value or Path(value).exists(), name, f"{value} does not exist")
            for set_name, value in self.eval.items():
                p.need(Path(value).exists(), f"eval.{set_name}", f"{value} does not exist")
        return p
