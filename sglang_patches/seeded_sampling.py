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


_M32 = 0xFFFFFFFF


def _rotl32(x, r: int):
    return ((x << r) | (x >> (32 - r))) & _M32


def _mix(h, k):
    k = _rotl32((k * 0xCC9E2D51) & _M32, 15)
    h = _rotl32(h ^ ((k * 0x1B873593) & _M32), 13)
    return (h * 5 + 0xE6546B64) & _M32


def _fmix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def murmur_hash32_torch(seed, positions, col_indices):
    """SGLang's murmur_hash32 (seed lo/hi, position, column) in int64 torch ops, bit for bit.

    Why by hand: on CPU SGLang calls an sgl_kernel op that the CPU wheel does not ship. Products of
    32-bit words wrap in int64 but keep their low 32 bits, which is all the hash uses.
    """
    import torch

    seed = seed.to(torch.int64)
    h = torch.zeros_like(seed)
    h = _mix(h, seed & _M32)
    h = _mix(h, (seed >> 32) & _M32)
    h = _mix(h, positions.to(torch.int64) & _M32)
    h = _mix(h[:, None], (col_indices.to(torch.int64) & _M32)[None, :])
    return _fmix32(h ^ 16)


def patch_cpu_hash() -> None:
    """Route CPU tensors of the seeded sampler to the torch hash; other devices keep SGLang's kernel."""
    import sglang.srt.layers.sampler as sampler

    original = sampler.murmur_hash32
    if getattr(original, "_sparrow", False):
        return

    def murmur_hash32(seed, positions, col_indices):
        if seed.device.type == "cpu":
            return murmur_hash32_torch(seed, positions, col_indices)
        return original(seed, positions, col_indices)

    murmur_hash32._sparrow = True
    sampler.murmur_hash32 = murmur_hash32
