"""Landmark update: the per-KV-head mean key of each newly completed page, into a landmark buffer.

Layouts (SGLang's token pool, page size 1; our logical pages are `page_size` consecutive positions):
    k_buffer        [num_slots, Hkv, D]           one layer's keys (post-RoPE)
    req_to_token    [pool_size, max_context] int  logical position of a request -> slot in k_buffer
    req_pool_indices[B] int                       each request's row in req_to_token / landmarks
    landmarks       [pool_size, max_pages, Hkv, D] in k_buffer's dtype; page p of the request in
                                                  pool row r is landmarks[r, p]

The math is `sparrow_megatron.sparsity.selection.compute_landmarks` (fp32 accumulate, store in the KV
dtype); the tests compare against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from sparrow_kernels._common import interpreting, next_pow2, round_bf16_rne


@triton.jit
def _landmark_kernel(
    K,
    ReqToToken,
    ReqPoolIdx,
    PageStart,
    PageEnd,
    Landmarks,
    stride_k_slot,
    stride_k_head,
    stride_rt_row,
    stride_lm_row,
    stride_lm_page,
    stride_lm_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(PageStart + b) + tl.program_id(2)
    if page < tl.load(PageEnd + b):
        req = tl.load(ReqPoolIdx + b).to(tl.int64)
        pos = page * PAGE_SIZE + tl.arange(0, PAGE_SIZE)
        slots = tl.load(ReqToToken + req * stride_rt_row + pos).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        k = tl.load(
            K + slots[:, None] * stride_k_slot + h * stride_k_head + offs_d[None, :],
            mask=mask_d[None, :],
            other=0.0,
        )
        mean = tl.sum(k.to(tl.float32), axis=0) / PAGE_SIZE
        if ROUND_BF16:
            mean = round_bf16_rne(mean)
        dst = Landmarks + req * stride_lm_row + page.to(tl.int64) * stride_lm_page + h * stride_lm_head
        tl.store(dst + offs_d, mean.to(Landmarks.dtype.element_ty), mask=mask_d)


def update_landmarks(
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prev_lens: Sequence[int] | torch.Tensor,
    new_lens: Sequence[int] | torch.Tensor,
    landmarks: torch.Tensor,
    page_size: int = 16,
) -> None:
    """Write the landmarks of the pages completed while a request grew from prev_lens to new_lens.

    Those are pages [prev // P, new // P): the prefill's full pages (prev = cached prefix, 0 for a fresh
    prompt) or, in decode (prev = new - 1), the page the new token just filled, if any.
    """
    prev = torch.as_tensor(prev_lens, dtype=torch.int64)
    new = torch.as_tensor(new_lens, dtype=torch.int64)
    page_start = prev.div(page_size, rounding_mode="floor")
    page_end = new.div(page_size, rounding_mode="floor")
    max_new_pages = int((page_end - page_start).max().item()) if len(new) else 0
    if max_new_pages <= 0:
        return
    if page_end.max().item() > landmarks.shape[1]:
        raise ValueError(f"landmark buffer holds {landmarks.shape[1]} pages, need {page_end.max().item()}")
    device = k_buffer.device
    num_kv_heads, head_dim = k_buffer.shape[1], k_buffer.shape[2]
    assert k_buffer.stride(2) == 1 and landmarks.stride(3) == 1 and req_to_token.stride(1) == 1
    grid = (len(new), num_kv_heads, max_new_pages)
    _landmark_kernel[grid](
        k_buffer,
        req_to_token,
        req_pool_indices.to(device),
        page_start.to(device=device, dtype=torch.int32),
        page_end.to(device=device, dtype=torch.int32),
        landmarks,
        k_buffer.stride(0),
        k_buffer.stride(1),
        req_to_token.stride(0),
        landmarks.stride(0),
        landmarks.stride(1),
        landmarks.stride(2),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim, 16),
        PAGE_SIZE=page_size,
        ROUND_BF16=interpreting() and landmarks.dtype == torch.bfloat16,
    )


@triton.jit
def _page_landmark_kernel(
    K,
    Pages,
    Landmarks,
    stride_k_slot,
    stride_k_head,
    stride_lm_page,
    stride_lm_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    page = tl.load(Pages + tl.program_id(0)).to(tl.int64)
    h = tl.program_id(1)
    if page >= 0:
        slots = page * PAGE_SIZE + tl.arange(0, PAGE_SIZE)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        k = tl.load(
            K + slots[:, None] * stride_k_slot + h * stride_k_head + offs_d[None, :],
            mask=mask_d[None, :],
            other=0.0,
        )
        mean = tl.sum(k.to(tl.float32), axis=0) / PAGE_SIZE
        if ROUND_BF16:
            mean = round_bf16_rne(mean)
        dst = Landmarks + page * stride_lm_page + h * stride_lm_head + offs_d
        tl.store(dst, mean.to(Landmarks.dtype.element_ty), mask=mask_d)


def update_page_landmarks(
    k_buffer: torch.Tensor, landmarks: torch.Tensor, pages: torch.Tensor, page_size: int = 16
) -> None:
    """Landmarks of whole PHYSICAL pages, in place: landmarks[p] = mean of slots [p*P, (p+1)*P) of k_buffer.

    The SGLang backend's layout (server page size P, so a logical page is one physical page):
    k_buffer [num_slots, Hkv, D], landmarks [num_slots // P, Hkv, D]. `pages` [N] int64 on the device,
    -1 = nothing to write (a fixed-size launch: CUDA-graph safe, no host read).
    """
    if pages.numel() == 0:
        return
    num_kv_heads, head_dim = k_buffer.shape[1], k_buffer.shape[2]
    assert k_buffer.stride(2) == 1 and landmarks.stride(2) == 1
    _page_landmark_kernel[(pages.numel(), num_kv_heads)](
        k_buffer,
        pages,
        landmarks,
        k_buffer.stride(0),
        k_buffer.stride(1),
        landmarks.stride(0),
        landmarks.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim, 16),
        PAGE_SIZE=page_size,
        ROUND_BF16=interpreting() and landmarks.dtype == torch.bfloat16,
    )


def landmark_buffer(
    pool_size: int, max_pages: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """An empty landmark buffer for one layer (see the module docstring for the layout)."""
    return torch.empty(pool_size, max_pages, num_kv_heads, head_dim, dtype=dtype, device=device)
