"""The synthetic task of the embedded default: multi-query associative recall over a long prompt.

The prompt lists `num_pairs` random `key:value` pairs (about 1.2K characters with the defaults, one
token per character with the tiny char tokenizer) and then `num_queries` keys to recall. The answer
repeats each query key with its value: `abc:42 def:17 ...`. To produce a value the model must attend
back to the one page that holds its pair, so a KV budget that drops that page changes the answer:
sparse and dense rollouts really differ. Checked exactly, value by value.

Examples are a pure function of (seed, split, index), so every process (rollout workers, evaluation,
the pretraining script) sees the same data without shipping files around.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Any

TRAIN = "train"
EVAL = "eval"
SPLITS = (TRAIN, EVAL)
QUERY_PREFIX = "recall:"


@dataclass(frozen=True)
class RecallTaskConfig:
    num_pairs: int = 160
    num_queries: int = 4
    key_len: int = 3
    value_len: int = 2
    key_alphabet: str = string.ascii_lowercase
    value_alphabet: str = string.digits
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries {self.num_queries} > num_pairs {self.num_pairs}")
        if len(self.key_alphabet) ** self.key_len < self.num_pairs:
            raise ValueError("key space smaller than num_pairs: keys could not be distinct")


@dataclass(frozen=True)
class RecallExample:
    split: str
    index: int
    pairs: tuple[tuple[str, str], ...]
    queries: tuple[str, ...]

    @property
    def values(self) -> tuple[str, ...]:
        table = dict(self.pairs)
        return tuple(table[k] for k in self.queries)

    @property
    def question(self) -> str:
        """The user message: the pairs, then the keys to recall."""
        listing = " ".join(f"{k}:{v}" for k, v in self.pairs)
        return f"{listing}\n{QUERY_PREFIX} {' '.join(self.queries)}"

    @property
    def answer(self) -> str:
        """The reference response (without the end-of-turn token)."""
        return " ".join(f"{k}:{v}" for k, v in zip(self.queries, self.values, strict=True))

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def prompt_text(self, tokenizer: Any) -> str:
        """The chat-formatted prompt, ending with the assistant header (generation starts there)."""
        return tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)


class RecallTask:
    """Seeded generator of recall examples with disjoint train / eval streams."""

    def __init__(self, config: RecallTaskConfig = RecallTaskConfig()):
        self.config = config

    def example(self, split: str, index: int, num_pairs: int | None = None) -> RecallExample:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        c = self.config
        n = c.num_pairs if num_pairs is None else num_pairs
        # A string seed is hashed with SHA-512 by random.Random: stable across processes and versions.
        rng = random.Random(f"recall/{c.seed}/{split}/{index}/{n}")
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < n:
            key = "".join(rng.choice(c.key_alphabet) for _ in range(c.key_len))
            if key not in seen:
                seen.add(key)
                keys.append(key)
        values = ["".join(rng.choice(c.value_alphabet) for _ in range(c.value_len)) for _ in keys]
        queries = tuple(rng.sample(keys, min(c.num_queries, n)))
        return RecallExample(
            split=split, index=index, pairs=tuple(zip(keys, values, strict=True)), queries=queries
        )

    def examples(self, split: str, count: int, start: int = 0) -> list[RecallExample]:
        return [self.example(split, i) for i in range(start, start + count)]


@dataclass(frozen=True)
class RecallScore:
    reward: float  # fraction of queries answered exactly
    correct: int
    total: int


_ITEM = re.compile(r"^([^:\s]+):(\S+)$")


def recall_reward(response: str, example: RecallExample) -> RecallScore:
    """Fraction of query values recalled exactly, in order. Extra items or junk count as nothing.

    The response is split on whitespace after dropping the end-of-turn marker; item i is correct only
    when it is exactly `query_i:value_i`.
    """
    text = response.split("<|im_end|>", 1)[0]
    items = text.split()
    expected = example.answer.split()
    correct = 0
    for i, want in enumerate(expected):
        if i < len(items) and _ITEM.match(items[i]) and items[i] == want:
            correct += 1
    total = len(expected)
    return RecallScore(reward=correct / total if total else 0.0, correct=correct, total=total)
