"""Truncated responses (grpo.overlong): left out of the loss, or DAPO's soft overlong penalty.

A response the engine cut at data.max_response_tokens reports SGLang's finish_reason "length". Its
reward says nothing about the answer it never finished, so `mask` keeps it out of the loss (it still
counts in its group's baseline: the advantages of its siblings are those of the whole group). `penalty`
is DAPO's soft overlong punishment: with L = max_response_tokens and a buffer B, a response of length
l > L - B adds -(l - (L - B)) / B * overlong_penalty to its reward, -overlong_penalty at l = L, so
the policy learns to finish before the cutoff instead of being hit by a cliff at it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sparrow_megatron.rollout.types import Sample

TRUNCATED = "length"


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float) -> float:
    """DAPO's soft penalty of a response of `length` tokens: 0 up to max_tokens - buffer, then a linear
    ramp to -factor at max_tokens. buffer 0 is the ramp's limit: -factor only at the cutoff itself."""
    if buffer == 0:
        return -factor if length >= max_tokens else 0.0
    exceed = length - (max_tokens - buffer)
    return min(-exceed / buffer * factor, 0.0)


def shaped_rewards(grpo, max_tokens: int, samples: Sequence[Sample], rewards: Sequence[float]) -> list[float]:
    """The rewards the advantages are computed from: with grpo.overlong 'penalty', plus the penalty."""
    if grpo.overlong != "penalty":
        return list(rewards)
    return [
        r + overlong_penalty(s.response_len, max_tokens, grpo.overlong_buffer, grpo.overlong_penalty)
        for s, r in zip(samples, rewards, strict=True)
    ]


def loss_masks(grpo, samples: Sequence[Sample]) -> list[list[int]] | None:
    """With grpo.overlong 'mask': 0 on every token of a truncated response, 1 elsewhere; else None."""
    if grpo.overlong != "mask" or not any(s.finish_reason == TRUNCATED for s in samples):
        return None
    return [[0 if s.finish_reason == TRUNCATED else 1] * s.response_len for s in samples]


def metrics(samples: Sequence[Sample], rewards: Sequence[float], shaped: Sequence[float]) -> dict[str, float]:
    n = max(len(samples), 1)
    return {
        "rollout/truncated_frac": sum(s.finish_reason == TRUNCATED for s in samples) / n,
        "reward/overlong_penalty": sum(b - a for a, b in zip(rewards, shaped, strict=True)) / n,
    }
