"""Builds an SGLang-style token pool (k/v buffers + req_to_token) from per-request logical K/V."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEVICE = (
    "cuda" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available() else "cpu"
)


@dataclass
class Pool:
    k_buffer: torch.Tensor  # [num_slots, Hkv, D]
    v_buffer: torch.Tensor
    req_to_token: torch.Tensor  # [pool_size, max_context] int32
    req_pool_indices: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32


def random_kv(lengths, num_kv_heads, head_dim, dtype=torch.bfloat16, generator=None):
    """Per-request logical keys and values, random (never zeros)."""
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=generator).to(dtype) for n in lengths]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=generator).to(dtype) for n in lengths]
    return keys, values


def build_pool(keys, values, max_context=None, generator=None) -> Pool:
    """Scatter the requests into shuffled slots and non-trivial pool rows, as a live server would."""
    lengths = [k.shape[0] for k in keys]
    total = sum(lengths)
    num_slots = total + 7
    perm = torch.randperm(num_slots, generator=generator)[:total]
    num_kv_heads, head_dim = keys[0].shape[1:]
    k_buffer = torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(keys[0].dtype)
    v_buffer = torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(keys[0].dtype)
    max_context = max_context or max(lengths) + 5
    pool_size = len(keys) + 2
    req_to_token = torch.full((pool_size, max_context), -1, dtype=torch.int32)
    rows = torch.randperm(pool_size, generator=generator)[: len(keys)].to(torch.int32)
    start = 0
    for b, n in enumerate(lengths):
        slots = perm[start : start + n]
        start += n
        req_to_token[rows[b], :n] = slots.to(torch.int32)
        k_buffer[slots] = keys[b]
        v_buffer[slots] = values[b]
    return Pool(
        k_buffer.to(DEVICE),
        v_buffer.to(DEVICE),
        req_to_token.to(DEVICE),
        rows.to(DEVICE),
        torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
    )
