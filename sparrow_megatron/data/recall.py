"""The synthetic task of the embedded default: multi-query associative recall over a long prompt.

The prompt lists `num_pairs` key/value pairs, each a key character followed by its value character,
separated by `gap` filler characters (about 1.2K characters with the defaults, one token per character
with the tiny char tokenizer), then `?` and the `num_queries` keys to recall. The answer repeats each
query key followed by its value: `kVmW`. To produce a value the model must attend back to the one page
that holds its pair, so a KV budget that drops that page changes the answer: sparse and dense rollouts
really differ. Checked exactly, value by value.

Keys, values and filler use disjoint alphabets, so a value follows its key exactly once in the prompt:
the lookup is a one-token induction that a 4-layer char-level model learns in minutes on a CPU core.
Examples are a pure function of (seed, split, index), so every process (rollout workers, evaluation,
the pretraining script) sees the same data without shipping files around.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAIN = "train"
EVAL = "eval"
SPLITS = (TRAIN, EVAL)
QUERY_MARK = "?"
# The tiny Qwen3 pretrained on this task (scripts/pretrain_tiny.py), installed with the package.
TINY_RECALL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_recall"


@dataclass(frozen=True)
class RecallTaskConfig:
    num_pairs: int = 32
    num_queries: int = 2
    gap: int = 32  # filler characters after each pair: spreads the pairs over the pages
    key_alphabet: str = string.ascii_lowercase + string.digits
    value_alphabet: str = string.ascii_uppercase
    filler_alphabet: str = ".,;:-+*/=_"
    value_first: bool = False  # write each pair as value then key in the listing
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(f"need 1 <= num_queries ({self.num_queries}) <= num_pairs ({self.num_pairs})")
        if self.num_pairs > len(self.key_alphabet):
            raise ValueError(f"num_pairs {self.num_pairs} > {len(self.key_alphabet)} distinct keys")
        key, value, filler = set(self.key_alphabet), set(self.value_alphabet), set(self.filler_alphabet)
        if key & value or key & filler or value & filler or QUERY_MARK in key | value | filler:
            raise ValueError("key, value and filler alphabets must be disjoint and exclude '?'")


@dataclass(frozen=True)
class RecallExample:
    split: str
    index: int
    pairs: tuple[tuple[str, str], ...]
    queries: tuple[str, ...]
    fillers: tuple[str, ...]
    value_first: bool = False

    @property
    def values(self) -> tuple[str, ...]:
        table = dict(self.pairs)
        return tuple(table[k] for k in self.queries)

    @property
    def question(self) -> str:
        """The user message: the pairs with filler between them, then the keys to recall."""
        order = (lambda k, v: v + k) if self.value_first else (lambda k, v: k + v)
        listing = "".join(order(k, v) + f for (k, v), f in zip(self.pairs, self.fillers, strict=True))
        return f"{listing}\n{QUERY_MARK}{''.join(self.queries)}"

    @property
    def answer(self) -> str:
        """The reference response (without the end-of-turn token): each query key, then its value."""
        return "".join(k + v for k, v in zip(self.queries, self.values, strict=True))

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

    def example(
        self, split: str, index: int, num_pairs: int | None = None, gap: int | None = None
    ) -> RecallExample:
        """Example `index` of `split`; num_pairs / gap override the config (pretraining curriculum)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        c = self.config
        n = c.num_pairs if num_pairs is None else num_pairs
        g = c.gap if gap is None else gap
        # A string seed is hashed with SHA-512 by random.Random: stable across processes and versions.
        rng = random.Random(f"recall/{c.seed}/{split}/{index}/{n}/{g}")
        keys = rng.sample(c.key_alphabet, n)
        values = [rng.choice(c.value_alphabet) for _ in keys]
        fillers = tuple("".join(rng.choice(c.filler_alphabet) for _ in range(g)) for _ in keys)
        queries = tuple(rng.sample(keys, min(c.num_queries, n)))
        pairs = tuple(zip(keys, values, strict=True))
        return RecallExample(split, index, pairs, queries, fillers, value_first=c.value_first)

    def examples(self, split: str, count: int, start: int = 0) -> list[RecallExample]:
        return [self.example(split, i) for i in range(start, start + count)]

    def prompts(
        self, tokenizer: Any, split: str, count: int, start: int = 0
    ) -> list[tuple[str, RecallExample]]:
        """(chat-formatted prompt, example) pairs for a rollout batch; score with recall_reward."""
        return [(ex.prompt_text(tokenizer), ex) for ex in self.examples(split, count, start)]


@dataclass(frozen=True)
class RecallScore:
    reward: float  # fraction of queries answered exactly
    correct: int
    total: int


def recall_reward(response: str, example: RecallExample) -> RecallScore:
    """Fraction of query values recalled exactly: item i of the response (2 characters: key, value,
    after stripping whitespace and the end-of-turn marker) must equal query i and its value. Anything
    after the last item is ignored (generation is capped by max_new_tokens)."""
    text = "".join(response.split("<|im_end|>", 1)[0].split())
    expected = example.answer
    total = len(example.queries)
    correct = sum(text[2 * i : 2 * i + 2] == expected[2 * i : 2 * i + 2] for i in range(total))
    return RecallScore(reward=correct / total, correct=correct, total=total)
