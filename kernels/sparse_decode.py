"""One block top-k sparse decode step for a batch: plan (the rule's plan_pages), scoring, top-k, attention.

This is the composition the SGLang backend runs per sparse layer; each stage is also callable alone
(`page_selection.score_pages`, `page_selection.top_k_pages`, `decode_attention.paged_decode_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sparrow_kernels.decode_attention import paged_decode_attention
from sparrow_kernels.page_selection import plan_batch, select_pages

from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY, PageGeometry


def sparse_paged_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_host: Sequence[int],
    budgets: Sequence[int | None] | int | None,
    landmarks: torch.Tensor,
    geometry: PageGeometry = DEFAULT_GEOMETRY,
    scale: float | None = None,
    pages_per_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(out [B, Hq, D], page_table [B, Hkv, max_selected] or None when all dense, num_selected [B] or None).

    `landmarks` must hold the full pages of every request (see `landmarks.update_landmarks`); the new
    token's K/V must already be in the pool (seq_lens count it).
    """
    plan = plan_batch(seq_lens_host, budgets, geometry, device=q.device)
    common = dict(scale=scale, page_size=geometry.page_size, pages_per_split=pages_per_split)
    if plan.all_dense:
        out = paged_decode_attention(
            q,
            k_buffer,
            v_buffer,
            req_to_token,
            req_pool_indices,
            seq_lens,
            max_pages=plan.max_selected,
            **common,
        )
        return out, None, None
    page_table, num_selected = select_pages(q, landmarks, req_pool_indices, plan)
    out = paged_decode_attention(
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        page_table,
        num_selected,
        max_pages=plan.max_selected,
        **common,
    )
    return out, page_table, num_selected
