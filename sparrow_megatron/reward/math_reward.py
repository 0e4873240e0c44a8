"""Math reward: 1 if the last `\\boxed{...}` of the response equals the ground truth, else 0.

Equality is symbolic, decided by the `math-verify` library (sympy under the hood): `\\frac{1}{2}`,
`0.5` and `1/2` agree; string match would not. Thinking-mode responses are graded on the final answer
part only (after `</think>`); a response still inside its thinking has no answer. Every 0 has a reason.

math-verify times out with SIGALRM, which only works in the main thread: elsewhere the timeout is off.
The training loop judges in worker processes (`reward/judge_pool.py`), where it is on, and kills a
judgement that hangs past it anyway (C code inside sympy never sees the signal).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

CORRECT = "correct"
WRONG = "wrong"
NO_ANSWER = "no_answer"  # no \boxed{...} in the final answer part
UNPARSABLE_ANSWER = "unparsable_answer"  # boxed, but math-verify could not read it
UNPARSABLE_GOLD = "unparsable_gold"  # the ground truth itself could not be read
UNFINISHED_THINKING = "unfinished_thinking"  # <think> without </think>: truncated in the thinking
REASONS = (CORRECT, WRONG, NO_ANSWER, UNPARSABLE_ANSWER, UNPARSABLE_GOLD, UNFINISHED_THINKING)

BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class MathRewardConfig:
    timeout_s: int = 5  # per parse / verify call (main thread only, see module docstring)
    float_rounding: int = 6


@dataclass(frozen=True)
class MathScore:
    reward: float
    reason: str
    extracted: str | None = None

    def to_dict(self) -> dict:
        return {"reward": int(self.reward), "reason": self.reason, "extracted": self.extracted}


def final_answer_part(response: str) -> str | None:
    """The text after the last `</think>`; the whole response if there is no thinking; None if the
    response opened a thinking block and never closed it."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "<think>" in response:
        return None
    return response


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x`), braces balanced."""
    start = max(text.rfind(cmd) for cmd in BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[rest.index("x") + 1 :] if rest.startswith("\\fbox") else rest[len("\\boxed") :]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        # `\boxed 5`: the argument runs to the next whitespace or `$`.
        token = rest.strip().split()[0] if rest.strip() else ""
        return token.split("$")[0] or None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None  # unbalanced: truncated in the middle of the answer


def _timeout(config: MathRewardConfig) -> int | None:
    return config.timeout_s if threading.current_thread() is threading.main_thread() else None


def parse_gold(answer: str, config: MathRewardConfig = MathRewardConfig()):
    """math-verify's parse of a ground-truth answer (boxed if it is not already)."""
    from math_verify import parse

    text = answer if any(cmd in answer for cmd in BOX_COMMANDS) else f"\\boxed{{{answer}}}"
    return parse(text, fallback_mode="no_fallback", parsing_timeout=_timeout(config))


def math_reward(response: str, answer: str, config: MathRewardConfig = MathRewardConfig()) -> MathScore:
    from math_verify import parse, verify

    final = final_answer_part(response)
    if final is None:
        return MathScore(0.0, UNFINISHED_THINKING)
    boxed = last_boxed(final)
    if boxed is None or not boxed.strip():
        return MathScore(0.0, NO_ANSWER)
    gold = parse_gold(str(answer), config)
    if not gold:
        return MathScore(0.0, UNPARSABLE_GOLD, boxed)
    predicted = parse(f"\\boxed{{{boxed}}}", fallback_mode="no_fallback", parsing_timeout=_timeout(config))
    if not predicted:
        return MathScore(0.0, UNPARSABLE_ANSWER, boxed)
    ok = verify(gold, predicted, float_rounding=config.float_rounding, timeout_seconds=_timeout(config))
    return MathScore(1.0 if ok else 0.0, CORRECT if ok else WRONG, boxed)


def math_reward_value(response: str, answer: str) -> float:
    """The reward alone: what a judge process sends back (module-level, so it pickles by name)."""
    return math_reward(response, answer).reward
