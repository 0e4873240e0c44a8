"""Reference block top-k sparse decode in plain torch (fp32 or bf16 inputs, fp32 math).

The ground truth the Triton kernels, the SGLang backend and the trainer's sparse forward are tested
against. It is written for clarity, one request and one KV head at a time, not for speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import (
    DEFAULT_GEOMETRY,
    PageGeometry,
    compute_landmarks,
    default_scale,
    group_mean_query,
    pages_to_token_mask,
    plan_pages,
    select_pages,
)


def sparse_decode_reference(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    budgets: Sequence[int | None] | int | None,
    geometry: PageGeometry = DEFAULT_GEOMETRY,
    scale: float | None = None,
    landmarks: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One decode step for a batch.

    q: [B, Hq, D] (the new token's query, post-RoPE); keys[b], values[b]: [L_b, Hkv, D] (the request's
    logical KV, the new token included); budgets: per request or shared, in tokens (None = dense);
    landmarks[b]: optional precomputed [>= L_b // P, Hkv, D] (default: computed from keys[b]).

    Returns (out [B, Hq, D] in q's dtype, selected pages per request [Hkv, n_selected] ascending).
    """
    batch, num_q_heads, head_dim = q.shape
    if not isinstance(budgets, Sequence):
        budgets = [budgets] * batch
    if not (len(keys) == len(values) == len(budgets) == batch):
        raise ValueError("q, keys, values and budgets must describe the same batch")
    scale = default_scale(head_dim) if scale is None else scale
    out = torch.empty(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    selected = []
    for b in range(batch):
        k, v = keys[b], values[b]
        total_len, num_kv_heads, _ = k.shape
        group = num_q_heads // num_kv_heads
        marks = compute_landmarks(k, geometry.page_size) if landmarks is None else landmarks[b]
        pages = select_pages(group_mean_query(q[b], num_kv_heads), marks, total_len, budgets[b], geometry)
        selected.append(pages)
        token_mask = pages_to_token_mask(pages, total_len, geometry.page_size)  # [Hkv, L]
        qf = q[b].float().reshape(num_kv_heads, group, head_dim)
        logits = torch.einsum("hgd,lhd->hgl", qf, k.float()) * scale
        logits = logits.masked_fill(~token_mask[:, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out[b] = torch.einsum("hgl,lhd->hgd", probs, v.float()).reshape(num_q_heads, head_dim)
    return out.to(q.dtype), selected


def position_budgets(schedule: Schedule | None, prompt_len: int, seq_len: int) -> list[int | None]:
    """The budget each query position of a sequence had during rollout (None = dense).

    Queries before `prompt_len` were the prefill (dense). Query t >= prompt_len is the decode step that
    fed token t, whose KV held t + 1 tokens.
    """
    if schedule is None:
        return [None] * seq_len
    return [None if t < prompt_len else schedule.budget_at(t + 1) for t in range(seq_len)]


def sparse_causal_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: Sequence[int | None],
    geometry: PageGeometry = DEFAULT_GEOMETRY,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced sparse attention of one sequence: every query attends to what rollout's decode
    step at its position attended to (DistillSparse's sparse forward, calibration's scoring).

    q [T, Hq, D], k/v [T, Hkv, D], budgets[t] for query t (see `position_budgets`).
    Returns (out [T, Hq, D] in q's dtype, token mask [Hkv, T, T] bool). Materialises T x T: a reference.
    """
    seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    scale = default_scale(head_dim) if scale is None else scale
    marks = compute_landmarks(k, geometry.page_size)
    q_means = group_mean_query(q, num_kv_heads)  # [T, Hkv, D]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    mask = causal.expand(num_kv_heads, -1, -1).clone()
    # Queries whose decode step had the same page plan select together (one batched call per run of
    # positions, ~page_size of them); the causal cut then trims each row to its own length.
    start = 0
    while start < seq_len:
        plan = plan_pages(start + 1, budgets[start], geometry)
        end = start + 1
        while end < seq_len and plan_pages(end + 1, budgets[end], geometry) == plan:
            end += 1
        if not plan.dense:  # dense rows keep the causal mask
            pages = select_pages(q_means[start:end], marks, end, budgets[start], geometry)  # [m, Hkv, n]
            rows = pages_to_token_mask(pages, end, geometry.page_size)  # [m, Hkv, end]
            mask[:, start:end, :end] = (rows & causal[start:end, None, :end]).transpose(0, 1)
        start = end
    qf = q.float().reshape(seq_len, num_kv_heads, group, head_dim)
    logits = torch.einsum("thgd,shd->hgts", qf, k.float()) * scale
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    out = torch.einsum("hgts,shd->thgd", torch.softmax(logits, dim=-1), v.float())
    return out.reshape(seq_len, num_q_heads, head_dim).to(q.dtype), mask
