"""`loop.dump_rollouts`: each step's samples as JSON lines, to follow a run token by token.

`<run_dir>/rollouts/step_<N>.jsonl`, one line per sample: its prompt and sample index, the prompt
length, the sampled ids, the engine's log-prob of each (the sparse actor that sampled it), the
trainer's (the dense policy that scored it, the `old` log-probs of the update), the reward before and
after shaping, the schedule, weights version and engine. The gap between the two log-prob rows is the
training-inference mismatch the tail monitor summarises; two runs that should agree (a resumed one and
its reference) can be compared sample by sample. A resumed run rewrites the files of the steps it
redoes. Off by default: 512 samples of 37K tokens make a step file of about 1 GB (~50 bytes a token).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sparrow_megatron.rollout.types import Sample


def rollout_rows(
    samples: Sequence[Sample],
    rewards: Sequence[float],
    shaped: Sequence[float],
    trainer_logprobs: Sequence[torch.Tensor],
) -> Iterator[dict[str, Any]]:
    """One record per sample, in batch order (floats as Python floats: JSON keeps them exactly)."""
    for s, reward, shaped_reward, dense in zip(samples, rewards, shaped, trainer_logprobs, strict=True):
        yield {
            "prompt_index": s.prompt_index,
            "sample_index": s.sample_index,
            "prompt_len": len(s.prompt_ids),
            "output_ids": list(s.output_ids),
            "engine_logprobs": [float(x) for x in s.logprobs],
            "trainer_logprobs": dense.double().tolist(),
            "reward": float(reward),
            "shaped_reward": float(shaped_reward),
            "finish_reason": s.finish_reason,
            "schedule": s.schedule,
            "weight_version": s.weight_version,
            "engine_id": s.engine_id,
        }
