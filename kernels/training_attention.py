"""Teacher-forced block-sparse attention for DistillSparse: forward and backward in Triton.

    block_sparse_attention(q, k, v, budgets, geometry=DEFAULT_GEOMETRY, scale=None) -> out
        q [T, Hq, D], k/v [T, Hkv, D] (one sequence, post-RoPE, bf16/fp16/fp32), budgets[t] = the budget
        the rollout's decode step at query t used (`reference.position_budgets`; None = dense).

Query t attends to exactly the pages the rollout selected when its KV held t + 1 tokens: the rule's
`plan_pages(t + 1, budgets[t])`, scores from the landmarks of the pages complete before it (the landmark
kernel on k), the same scoring and top-k kernels as decode (each query row is one "request"), under
no gradient like the rollout. Nothing T x T is built: sparse rows keep a page table
[rows, Hkv, budget/P] int32, dense rows (prompt, or t + 1 <= budget) walk pages 0..t // P with a causal
mask. One program per (query, KV head) serves the G query heads of the group; the backward recomputes
the probabilities from the saved log-sum-exp and scatters dK/dV with fp32 atomic adds.

The ground truth is `sparrow_megatron.sparsity.reference.sparse_causal_attention_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from sparrow_kernels._common import dot_min, interpreting, mma, next_pow2
from sparrow_kernels.landmarks import update_landmarks
from sparrow_kernels.page_selection import plan_batch, score_pages, top_k_pages

from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY, PageGeometry, plan_pages

_ROWS_PER_CHUNK = 1024  # query rows scored at a time, bounds the [rows, Hkv, candidates] score buffer


@triton.jit
def _pages_of_row(t, RowOf, NumSelected, PAGE_SIZE: tl.constexpr):
    row = tl.load(RowOf + t)
    n = tl.where(row < 0, t // PAGE_SIZE + 1, tl.load(NumSelected + tl.maximum(row, 0)))
    return row, n


@triton.jit
def _row_keys(
    t, h, p0, row, n, PageTable, stride_pt_row, stride_pt_head, page_of, tok_of, PAGE_SIZE: tl.constexpr
):
    idx = p0 + page_of
    ok = idx < n
    table = tl.load(
        PageTable + tl.maximum(row, 0).to(tl.int64) * stride_pt_row + h * stride_pt_head + idx,
        mask=ok & (row >= 0),
        other=0,
    )
    page = tl.where(row < 0, idx, table)
    pos = page * PAGE_SIZE + tok_of
    return pos.to(tl.int64), ok & (pos <= t)


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    RowOf,
    PageTable,
    NumSelected,
    Out,
    Lse,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_pt_row,
    stride_pt_head,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    sm_scale,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_gd = (offs_g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    heads = h * GROUP + offs_g
    q = tl.load(Q + t * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :], mask=mask_gd, other=0.0)
    BLOCK_N: tl.constexpr = PAGES_PER_BLOCK * PAGE_SIZE
    offs_n = tl.arange(0, BLOCK_N)
    page_of = offs_n // PAGE_SIZE
    tok_of = offs_n % PAGE_SIZE
    row, n = _pages_of_row(t, RowOf, NumSelected, PAGE_SIZE)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for p0 in range(0, n, PAGES_PER_BLOCK):
        pos, valid = _row_keys(
            t, h, p0, row, n, PageTable, stride_pt_row, stride_pt_head, page_of, tok_of, PAGE_SIZE
        )
        kv_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + pos[:, None] * stride_k_t + h * stride_k_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + pos[:, None] * stride_v_t + h * stride_v_h + offs_d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), FP32_DOT) * sm_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        Out + t * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_gd,
    )
    tl.store(Lse + t * stride_lse_t + heads, m_i + tl.log(l_i), mask=offs_g < GROUP)


@triton.jit
def _bwd_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    RowOf,
    PageTable,
    NumSelected,
    DQ,
    DK,
    DV,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_do_t,
    stride_do_h,
    stride_lse_t,
    stride_pt_row,
    stride_pt_head,
    stride_dq_t,
    stride_dq_h,
    stride_dk_t,
    stride_dk_h,
    sm_scale,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    mask_gd = mask_g[:, None] & mask_d[None, :]
    heads = h * GROUP + offs_g
    q = tl.load(Q + t * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :], mask=mask_gd, other=0.0)
    do = tl.load(
        DO + t * stride_do_t + heads[:, None] * stride_do_h + offs_d[None, :], mask=mask_gd, other=0.0
    )
    lse = tl.load(Lse + t * stride_lse_t + heads, mask=mask_g, other=0.0)
    delta = tl.load(Delta + t * stride_lse_t + heads, mask=mask_g, other=0.0)
    BLOCK_N: tl.constexpr = PAGES_PER_BLOCK * PAGE_SIZE
    offs_n = tl.arange(0, BLOCK_N)
    page_of = offs_n // PAGE_SIZE
    tok_of = offs_n % PAGE_SIZE
    row, n = _pages_of_row(t, RowOf, NumSelected, PAGE_SIZE)

    dq = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for p0 in range(0, n, PAGES_PER_BLOCK):
        pos, valid = _row_keys(
            t, h, p0, row, n, PageTable, stride_pt_row, stride_pt_head, page_of, tok_of, PAGE_SIZE
        )
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(K + pos[:, None] * stride_k_t + h * stride_k_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + pos[:, None] * stride_v_t + h * stride_v_h + offs_d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), FP32_DOT) * sm_scale
        p = tl.where(valid[None, :] & mask_g[:, None], tl.exp(s - lse[:, None]), 0.0)  # [G, N]
        dv = mma(tl.trans(p.to(do.dtype)), do, FP32_DOT)  # [N, D]
        dp = mma(do, tl.trans(v), FP32_DOT)  # [G, N]
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, FP32_DOT)
        dk = mma(tl.trans(ds.to(q.dtype)), q, FP32_DOT)  # [N, D]
        tl.atomic_add(DV + pos[:, None] * stride_dk_t + h * stride_dk_h + offs_d[None, :], dv, mask=kv_mask)
        tl.atomic_add(
            DK + pos[:, None] * stride_dk_t + h * stride_dk_h + offs_d[None, :], dk * sm_scale, mask=kv_mask
        )
    tl.store(
        DQ + t * stride_dq_t + heads[:, None] * stride_dq_h + offs_d[None, :], dq * sm_scale, mask=mask_gd
    )


def select_rows(
    q: torch.Tensor, k: torch.Tensor, budgets: Sequence[int | None], geometry: PageGeometry = DEFAULT_GEOMETRY
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rollout's selection at every query position, without gradient.

    Returns (row_of [T] int32: the query's row in page_table, -1 for dense queries;
    page_table [rows, Hkv, max_selected] int32 ascending; num_selected [rows] int32).
    """
    seq_len, _, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if len(budgets) != seq_len:
        raise ValueError(f"{len(budgets)} budgets for {seq_len} query positions")
    device = q.device
    sparse_rows = [t for t in range(seq_len) if not plan_pages(t + 1, budgets[t], geometry).dense]
    row_of = torch.full((seq_len,), -1, dtype=torch.int32)
    row_of[sparse_rows] = torch.arange(len(sparse_rows), dtype=torch.int32)
    row_of = row_of.to(device)
    if not sparse_rows:
        empty = torch.zeros(1, num_kv_heads, 1, dtype=torch.int32, device=device)
        return row_of, empty, torch.zeros(1, dtype=torch.int32, device=device)
    with torch.no_grad():
        page = geometry.page_size
        marks = torch.empty(1, max(seq_len // page, 1), num_kv_heads, head_dim, dtype=k.dtype, device=device)
        identity = torch.arange(seq_len, dtype=torch.int32, device=device)[None]
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        update_landmarks(k.contiguous(), identity, zero, [0], [seq_len], marks, page)
        tables, counts = [], []
        for c0 in range(0, len(sparse_rows), _ROWS_PER_CHUNK):
            rows = sparse_rows[c0 : c0 + _ROWS_PER_CHUNK]
            plan = plan_batch([t + 1 for t in rows], [budgets[t] for t in rows], geometry, device=device)
            rows_q = q.detach()[torch.tensor(rows, device=device)].contiguous()
            pool_rows = torch.zeros(len(rows), dtype=torch.int32, device=device)
            table, count = top_k_pages(score_pages(rows_q, marks, pool_rows, plan), plan)
            tables.append(table)
            counts.append(count)
        width = max(t.shape[2] for t in tables)
        page_table = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[2])) for t in tables])
        return row_of, page_table.contiguous(), torch.cat(counts)


class BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, row_of, page_table, num_selected, scale, page_size, pages_per_block):
        seq_len, num_q_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(seq_len, num_q_heads, dtype=torch.float32, device=q.device)
        meta = dict(
            GROUP=group,
            BLOCK_G=next_pow2(group, dot_min()),
            HEAD_DIM=head_dim,
            BLOCK_D=next_pow2(head_dim, 16),
            PAGE_SIZE=page_size,
            PAGES_PER_BLOCK=pages_per_block,
            FP32_DOT=interpreting(),
        )
        _fwd_kernel[(seq_len, num_kv_heads)](
            q, k, v, row_of, page_table, num_selected, out, lse,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            page_table.stride(0), page_table.stride(1), out.stride(0), out.stride(1), lse.stride(0),
            scale, **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, row_of, page_table, num_selected)
        ctx.scale = scale
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, row_of, page_table, num_selected = ctx.saved_tensors
        seq_len, num_kv_heads = q.shape[0], k.shape[1]
        do = grad_out.contiguous()
        delta = (do.float() * out.float()).sum(-1).contiguous()  # [T, Hq]
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        _bwd_kernel[(seq_len, num_kv_heads)](
            q, k, v, do, lse, delta, row_of, page_table, num_selected, dq, dk, dv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), lse.stride(0), page_table.stride(0), page_table.stride(1),
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
            ctx.scale, **ctx.meta,
        )  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: Sequence[int | None],
    geometry: PageGeometry = DEFAULT_GEOMETRY,
    scale: float | None = None,
    pages_per_block: int = 4,
) -> torch.Tensor:
    """See the module docstring. Differentiable in q, k and v; the selection carries no gradient."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    row_of, page_table, num_selected = select_rows(q, k, budgets, geometry)
    return BlockSparseAttention.apply(
        q, k, v, row_of, page_table, num_selected, scale, geometry.page_size, pages_per_block
    )
