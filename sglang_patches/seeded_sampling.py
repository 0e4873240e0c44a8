"""Per-request sampling seeds that hold without SGLang's deterministic-inference mode.

SGLang honours `sampling_seed` only under --enable-deterministic-inference, which accepts only its own
attention backends (not `sparrow`). Otherwise it samples from the engine's global RNG stream, so a
request's tokens depend on every request the engine served before it: a resumed RL run, whose fresh
engine starts the stream over, would sample other tokens than the uninterrupted run. With
SPARROW_SEEDED_SAMPLING=1 every sampling batch carries per-request seeds, so SGLang's own seeded
sampler (a Gumbel draw hashed from seed and position) is used; a request without a seed gets a random
one, drawn once. SGLang's flashinfer sampler refuses seeds: on GPU pair this with
--sampling-backend pytorch (the rollout fleet does).
"""

from __future__ import annotations

import os
import random

ENV_FLAG = "SPARROW_SEEDED_SAMPLING"
TARGET = "sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo.from_schedule_batch"


def enabled() -> bool:
    return os.environ.get(ENV_FLAG, "0") == "1"


def attach_seeds(info, cls, batch, *args, **kwargs):
    """HookType.AFTER of SamplingBatchInfo.from_schedule_batch: fill `sampling_seed` for every request."""
    import torch

    if info.sampling_seed is not None:
        return info
    seeds = []
    for req in batch.reqs:
        params = req.sampling_params
        if params.sampling_seed is None:
            params.sampling_seed = random.getrandbits(62)  # fixed for the request's whole life
        seeds.append(params.sampling_seed)
    info.sampling_seed = torch.tensor(seeds, dtype=torch.int64, device=batch.device)
    return info
