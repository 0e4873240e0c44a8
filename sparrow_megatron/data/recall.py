"""The synthetic task of the embedded default: needle recall over a long prompt.

The prompt is a haystack of `haystack_len` filler characters (1100 by default, one token per character
with the tiny char tokenizer) with one needle of each class hidden at a random place: a digit, an
uppercase letter, a lowercase letter. Then `?` and the class markers asked for, in class order (`#`
digit, `@` uppercase, `&` lowercase; all three by default). The answer repeats each marker followed by
the needle of that class: `#7@Q&x`. Each needle sits in one page of 16 tokens among ~70: a KV budget
(sink + local + top-k pages) that drops that page cannot answer, so sparse and dense rollouts really
differ. Checked exactly.

Why needles and not key/value pairs: key -> value lookup needs an induction circuit, which a tiny model
did not form within the ~10 CPU-minutes the pretraining may take here (tried; loss stayed at chance).
A needle is found by matching its class directly, which a 4-layer model learns in minutes, and the
accuracy at full length stays partial when training used shorter haystacks: room for RL.
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
# The embedded default's haystack range: prompts of ~0.54K-1.56K tokens put the decode positions in 4-5
# position bins of 256, so the tails and the controller's budgets vary by position. The tiny model,
# pretrained on haystacks up to 512 and evaluated at 1100, recalls ~0.9 of needles at 512 and ~0.75 at
# 1100, ~0.25 at 1600-2048 (greedy, 12 prompts each): 2K would leave the longest bins near zero.
EMBEDDED_HAYSTACK = (512, 1536)
NEEDLE_CLASSES = (("#", string.digits), ("@", string.ascii_uppercase), ("&", string.ascii_lowercase))


@dataclass(frozen=True)
class RecallTaskConfig:
    haystack_len: int = 1100
    # > 0: each example's haystack length is drawn (seeded per example) from [min_haystack_len,
    # haystack_len], so decode positions span several position bins; 0: every example has haystack_len.
    min_haystack_len: int = 0
    num_queries: int = 3  # needles asked per prompt (reward = fraction recalled exactly)
    needle_classes: tuple[tuple[str, str], ...] = NEEDLE_CLASSES
    filler_alphabet: str = ".,;:-+*/=_"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_queries <= len(self.needle_classes):
            raise ValueError(
                f"need 1 <= num_queries ({self.num_queries}) <= {len(self.needle_classes)} classes"
            )
        shortest = self.min_haystack_len or self.haystack_len
        if shortest < len(self.needle_classes):
            raise ValueError(f"haystack length {shortest} cannot hold {len(self.needle_classes)} needles")
        if self.min_haystack_len > self.haystack_len:
            raise ValueError(f"min_haystack_len {self.min_haystack_len} > haystack_len {self.haystack_len}")
        sets = [set(self.filler_alphabet)] + [set(a) for _, a in self.needle_classes]
        sets.append({m for m, _ in self.needle_classes} | {QUERY_MARK})
        if sum(len(x) for x in sets) != len(set().union(*sets)):
            raise ValueError("filler, needle alphabets and markers (plus '?') must be disjoint")


@dataclass(frozen=True)
class RecallExample:
    split: str
    index: int
    haystack: str  # filler with the needles in place
    needles: tuple[tuple[str, str, int], ...]  # (class marker, needle character, position)
    queries: tuple[str, ...]  # class markers asked for, in answer order

    @property
    def values(self) -> tuple[str, ...]:
        table = {marker: char for marker, char, _ in self.needles}
        return tuple(table[m] for m in self.queries)

    @property
    def question(self) -> str:
        """The user message: the haystack, then the class markers to recall."""
        return f"{self.haystack}\n{QUERY_MARK}{''.join(self.queries)}"

    @property
    def answer(self) -> str:
        """The reference response (without the end-of-turn token): each marker, then its needle."""
        return "".join(m + v for m, v in zip(self.queries, self.values, strict=True))

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

    def example(self, split: str, index: int, haystack_len: int | None = None) -> RecallExample:
        """Example `index` of `split`; haystack_len overrides the config (pretraining curriculum)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        c = self.config
        n = c.haystack_len if haystack_len is None else haystack_len
        if haystack_len is None and c.min_haystack_len:
            # Its own stream: an example of length n is the same as with a fixed haystack_len = n.
            n = random.Random(f"recall/{c.seed}/{split}/{index}/length").randint(c.min_haystack_len, n)
        # A string seed is hashed with SHA-512 by random.Random: stable across processes and versions.
        rng = random.Random(f"recall/{c.seed}/{split}/{index}/{n}")
        chars = [rng.choice(c.filler_alphabet) for _ in range(n)]
        positions = rng.sample(range(n), len(c.needle_classes))
        needles = []
        for (marker, alphabet), pos in zip(c.needle_classes, positions, strict=True):
            chars[pos] = rng.choice(alphabet)
            needles.append((marker, chars[pos], pos))
        # Asked in the fixed class order: the answer's markers are then known from the format alone and
        # only the needles themselves must be retrieved.
        chosen = set(rng.sample([m for m, _ in c.needle_classes], c.num_queries))
        queries = tuple(m for m, _ in c.needle_classes if m in chosen)
        return RecallExample(split, index, "".join(chars), tuple(needles), queries)

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
