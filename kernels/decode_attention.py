"""Paged decode attention over per-(request, KV head) page lists: flash-decoding + log-sum-exp merge.

Signature (what the SGLang backend calls, one layer at a time):

    paged_decode_attention(
        q,                 # [B, Hq, D] bf16/fp16, the new token's query (post-RoPE)
        k_buffer,          # [num_slots, Hkv, D] the layer's key pool (SGLang token pool, page size 1)
        v_buffer,          # [num_slots, Hkv, D]
        req_to_token,      # [pool_size, max_context] int32/int64: (pool row, logical position) -> slot
        req_pool_indices,  # [B] int: each request's row in req_to_token
        seq_lens,          # [B] int32: tokens in each request's KV, the new token included
        page_table=None,   # [B, Hkv, max_selected] int32 logical page ids (page p = positions
                           #   [p*P, (p+1)*P)); None = dense: every page 0..ceil(L/P)-1
        num_selected=None, # [B] int32 valid entries of page_table per request (same for all KV heads)
        scale=None,        # softmax scale, default 1/sqrt(D)
        page_size=16,
        pages_per_split=None,  # flash-decoding split size in pages (default: enough splits to fill the GPU)
    ) -> out [B, Hq, D] in q's dtype

The page table is what `page_selection.select_pages` returns. Query head h uses KV head h // G. One
program per (request, KV head, split) loads each K/V tile once for all G query heads of the group
(a [G, D] x [D, N] product), accumulates in fp32 with an online softmax, and writes a partial output and
log-sum-exp per split; a second kernel merges the splits. The dense path is the same kernel with page
id = list index, so dense and sparse read K/V the same way and only the bytes differ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sparrow_kernels._common import dot_min, interpreting, mma, next_pow2


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    ReqToToken,
    ReqPoolIdx,
    SeqLens,
    PageTable,
    NumSelected,
    MidO,
    MidLse,
    stride_q_b,
    stride_q_h,
    stride_k_slot,
    stride_k_head,
    stride_v_slot,
    stride_v_head,
    stride_rt_row,
    stride_pt_b,
    stride_pt_h,
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    sm_scale,
    pages_per_split,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr,
    DENSE: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    if DENSE:  # noqa: SIM108 (constexpr branch: only one side is compiled)
        n_sel = tl.cdiv(seq_len, PAGE_SIZE)
    else:
        n_sel = tl.load(NumSelected + b)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, n_sel)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = h * GROUP + offs_g
    q = tl.load(
        Q + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    req = tl.load(ReqPoolIdx + b).to(tl.int64)
    BLOCK_N: tl.constexpr = PAGES_PER_BLOCK * PAGE_SIZE
    offs_n = tl.arange(0, BLOCK_N)
    page_of = offs_n // PAGE_SIZE
    tok_of = offs_n % PAGE_SIZE

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for p0 in range(first, last, PAGES_PER_BLOCK):
        idx = p0 + page_of
        page_ok = idx < last
        if DENSE:
            page = idx
        else:
            page = tl.load(PageTable + b * stride_pt_b + h * stride_pt_h + idx, mask=page_ok, other=0)
        pos = page * PAGE_SIZE + tok_of
        valid = page_ok & (pos < seq_len)
        slot = tl.load(ReqToToken + req * stride_rt_row + pos, mask=valid, other=0).to(tl.int64)
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(
            K + slot[:, None] * stride_k_slot + h * stride_k_head + offs_d[None, :], mask=kv_mask, other=0.0
        )
        v = tl.load(
            V + slot[:, None] * stride_v_slot + h * stride_v_head + offs_d[None, :], mask=kv_mask, other=0.0
        )
        s = mma(q, tl.trans(k), FP32_DOT) * sm_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new

    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(
        MidO + b * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s + offs_d[None, :],
        out,
        mask=mask_g[:, None] & mask_d[None, :],
    )
    tl.store(MidLse + b * stride_ml_b + heads * stride_ml_h + split, lse, mask=mask_g)


@triton.jit
def _merge_kernel(
    MidO,
    MidLse,
    Out,
    num_splits,
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    stride_o_b,
    stride_o_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_ml_b + h * stride_ml_h + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row with nothing to read (masked by data) writes 0
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
    o = tl.load(
        MidO + b * stride_mo_b + h * stride_mo_h + offs_s[:, None] * stride_mo_s + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + b * stride_o_b + h * stride_o_h + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def paged_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor | None = None,
    num_selected: torch.Tensor | None = None,
    scale: float | None = None,
    page_size: int = 16,
    pages_per_split: int | None = None,
    max_pages: int | None = None,
    pages_per_block: int = 4,
) -> torch.Tensor:
    """See the module docstring. `max_pages` (the longest page list) avoids a device->host read when
    the caller knows it (host seq_lens in SGLang, `BatchPlan.max_selected`)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    dense = page_table is None
    if not dense and num_selected is None:
        raise ValueError("a page_table needs num_selected")
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if max_pages is None:
        if dense:
            max_pages = int(triton.cdiv(int(seq_lens.max().item()), page_size)) if batch else 0
        else:
            max_pages = int(num_selected.max().item()) if batch else 0
    out = torch.empty_like(q)
    if batch == 0 or max_pages == 0:
        return out.zero_()
    if pages_per_split is None:
        target_splits = max(1, triton.cdiv(2 * _num_sms(q.device), batch * num_kv_heads))
        pages_per_split = triton.cdiv(max_pages, target_splits)
    pages_per_split = triton.cdiv(max(pages_per_split, 1), pages_per_block) * pages_per_block
    num_splits = triton.cdiv(max_pages, pages_per_split)
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert req_to_token.stride(1) == 1
    mid_o = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    dummy = seq_lens  # unused pointer in the dense specialisation
    _split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        dummy if dense else page_table,
        dummy if dense else num_selected,
        mid_o,
        mid_lse,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        0 if dense else page_table.stride(0),
        0 if dense else page_table.stride(1),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        scale,
        pages_per_split,
        GROUP=group,
        BLOCK_G=next_pow2(group, dot_min()),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim, 16),
        PAGE_SIZE=page_size,
        PAGES_PER_BLOCK=pages_per_block,
        DENSE=dense,
        FP32_DOT=interpreting(),
    )
    _merge_kernel[(batch, num_q_heads)](
        mid_o,
        mid_lse,
        out,
        num_splits,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim, 16),
        BLOCK_S=next_pow2(num_splits),
    )
    return out
