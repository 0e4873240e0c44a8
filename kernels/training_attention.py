"""Teacher-forced block-sparse attention for DistillSparse: forward and backward in Triton.

    block_sparse_attention(q, k, v, budgets, geometry=DEFAULT_GEOMETRY, scale=None) -> out
        q [T, Hq, D], k/v [T, Hkv, D] (one sequence, post-RoPE, bf16/fp16/fp32); budgets: the budget the
        rollout's decode step at query t used, per query (`reference.position_budgets`, None = dense), or
        the same as an int64 tensor [T] with -1 = dense (`budget_tensor`).

Query t attends to exactly the pages the rollout selected when its KV held t + 1 tokens: the rule's plan
for (t + 1, budgets[t]), scores from the landmarks of the pages complete before it (the landmark kernel
on k), the same scoring and top-k kernels as decode (each query row is one "request"), under no gradient
like the rollout. The plan of every row is computed on the device from the budget tensor (`plan_rows`),
never per position on the host.

Tiling, as block-sparse attention kernels do. Queries are cut into blocks of R consecutive positions;
the R x G query heads of one KV head form one [R * G, D] tile. Each query block walks the union of the
pages its rows selected (`Selection.q_pages`), and each row's own selection and the causal cut are applied
inside the union from a per-row page bitmap ([T, Hkv, ceil(pages / 8)] uint8, the only per-row state
kept: 1 bit per (row, KV head, page)). Dense rows (prompt, t + 1 <= budget) select every page 0..t // P.

Backward, without atomics: dK/dV in a KV-block-major pass (one program per KV block of a few pages and
KV head, iterating over the query blocks that selected any of its pages: `Selection.kv_q_blocks`, the
inverted index, built on the device), dQ in a query-block-major pass over the same unions as the forward.
Each gradient element is written by exactly one program, so gradients are deterministic.

The ground truth is `sparrow_megatron.sparsity.reference.sparse_causal_attention_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from sparrow_kernels._common import interpreting, mma, next_pow2
from sparrow_kernels.landmarks import update_landmarks
from sparrow_kernels.page_selection import BatchPlan, score_pages, top_k_pages

from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY, PageGeometry

_ROWS_PER_CHUNK = 1024  # query rows scored at a time, bounds the [rows, Hkv, candidates] score buffer


def budget_tensor(
    budgets: Sequence[int | None] | torch.Tensor, seq_len: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-query budgets as int64 [T] on `device`, -1 = dense (a tensor passes through)."""
    if isinstance(budgets, torch.Tensor):
        out = budgets.to(device=device, dtype=torch.int64)
    else:
        out = torch.tensor([-1 if b is None else int(b) for b in budgets], dtype=torch.int64, device=device)
    if out.shape != (seq_len,):
        raise ValueError(f"{out.numel()} budgets for {seq_len} query positions")
    return out


def fixed_budgets(
    prompt_len: int, seq_len: int, budget: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One budget at every response position, the prompt dense: the fixed-budget training mode."""
    t = torch.arange(seq_len, device=device)
    return torch.where(t < prompt_len, -1, budget).to(torch.int64)


def plan_rows(budgets: torch.Tensor, start: int, end: int, geometry: PageGeometry) -> BatchPlan:
    """The rule's page plan of query rows [start, end) (row t's KV holds t + 1 tokens), on the device.

    The same plan as `selection.plan_pages(t + 1, budgets[t])`, as tensor arithmetic; the host widths
    are bounds (the last row has the most pages), so nothing is read back.
    """
    page = geometry.page_size
    device = budgets.device
    total = torch.arange(start + 1, end + 1, device=device, dtype=torch.int64)
    budget = budgets[start:end]
    pages = (total + page - 1) // page
    dense = (budget < 0) | (total <= budget)
    sink, local = geometry.sink_pages, geometry.local_pages
    zero = torch.zeros_like(pages)
    cand_start = torch.where(dense, zero, zero + sink)
    cand_end = torch.where(dense, cand_start, pages - local)
    top_k = torch.where(dense, zero - 1, budget // page - sink - local)
    selected = torch.where(dense, pages, budget // page)
    max_pages = -(-end // page)
    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    return BatchPlan(
        num_pages=i32(pages),
        cand_start=i32(cand_start),
        cand_end=i32(cand_end),
        top_k=i32(top_k),
        num_selected=i32(selected),
        max_candidates=max(max_pages - sink - local, 0),
        max_selected=max_pages,
        all_dense=False,
    )


def _check_budgets(budgets: torch.Tensor, geometry: PageGeometry) -> None:
    page = geometry.page_size
    total = torch.arange(1, budgets.numel() + 1, device=budgets.device)
    sparse = (budgets >= 0) & (total > budgets)
    bad = sparse & ((budgets % page != 0) | (budgets < geometry.min_budget))
    if bool(bad.any()):
        b = int(budgets[bad][0])
        raise ValueError(
            f"budget {b} must be a multiple of page_size {page} and at least {geometry.min_budget} (sink + local pages)"
        )


def _compact(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., N] -> (indices of the True entries, ascending [..., U] int32; their count [...] int32)."""
    count = sel.sum(-1, dtype=torch.int32)
    width = max(int(count.max()) if count.numel() else 0, 1)
    slot = torch.where(sel, sel.cumsum(-1) - 1, width)  # False entries land in a dropped column
    table = torch.zeros(*sel.shape[:-1], width + 1, dtype=torch.int32, device=sel.device)
    index = torch.arange(sel.shape[-1], dtype=torch.int32, device=sel.device).expand_as(sel)
    table.scatter_(-1, slot, index)
    return table[..., :width].contiguous(), count.contiguous()


@dataclass
class Selection:
    """The rollout's selection of one sequence, tiled for the kernels (all on the device)."""

    row_bits: torch.Tensor  # [T, Hkv, ceil(pages / 8)] uint8: bit p of row t = page p selected
    q_pages: torch.Tensor  # [query blocks, Hkv, U] int32: union of the block's pages, ascending
    q_count: torch.Tensor  # [query blocks, Hkv] int32
    kv_q_blocks: torch.Tensor  # [KV blocks, Hkv, V] int32: query blocks that selected any page of it
    kv_count: torch.Tensor  # [KV blocks, Hkv] int32
    rows_per_block: int
    pages_per_kv_block: int


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    budgets: torch.Tensor,
    geometry: PageGeometry = DEFAULT_GEOMETRY,
    rows_per_block: int = 16,
    pages_per_kv_block: int = 4,
) -> Selection:
    """The rollout's selection at every query position (no gradient), with both block indexes."""
    seq_len, _, head_dim = q.shape
    num_kv_heads = k.shape[1]
    device = q.device
    page = geometry.page_size
    num_pages = -(-seq_len // page)
    num_blocks = -(-seq_len // rows_per_block)
    bytes_per_row = -(-num_pages // 8)
    chunk = max(rows_per_block, _ROWS_PER_CHUNK // rows_per_block * rows_per_block)
    shifts = (1 << torch.arange(8, device=device, dtype=torch.int32)).to(torch.int32)
    row_bits = torch.empty(seq_len, num_kv_heads, bytes_per_row, dtype=torch.uint8, device=device)
    block_sel = torch.empty(num_blocks, num_kv_heads, num_pages, dtype=torch.bool, device=device)
    with torch.no_grad():
        marks = torch.zeros(1, max(seq_len // page, 1), num_kv_heads, head_dim, dtype=k.dtype, device=device)
        identity = torch.arange(seq_len, dtype=torch.int32, device=device)[None]
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        update_landmarks(k.detach().contiguous(), identity, zero, [0], [seq_len], marks, page)
        for c0 in range(0, seq_len, chunk):
            c1 = min(c0 + chunk, seq_len)
            plan = plan_rows(budgets, c0, c1, geometry)
            pool_rows = torch.zeros(c1 - c0, dtype=torch.int32, device=device)
            rows_q = q.detach()[c0:c1].contiguous()
            table, count = top_k_pages(score_pages(rows_q, marks, pool_rows, plan), plan)
            # page table -> bool [rows, Hkv, pages]: entries past a row's count go to a dropped column
            width = table.shape[2]
            valid = torch.arange(width, device=device)[None, None, :] < count[:, None, None]
            sel = torch.zeros(c1 - c0, num_kv_heads, num_pages + 1, dtype=torch.bool, device=device)
            sel.scatter_(-1, torch.where(valid, table, num_pages).long(), True)
            sel = sel[..., :num_pages]
            padded = torch.nn.functional.pad(sel, (0, bytes_per_row * 8 - num_pages))
            packed = (padded.view(c1 - c0, num_kv_heads, bytes_per_row, 8).to(torch.int32) * shifts).sum(-1)
            row_bits[c0:c1] = packed.to(torch.uint8)
            rows_pad = -(-(c1 - c0) // rows_per_block) * rows_per_block
            sel = torch.nn.functional.pad(sel, (0, 0, 0, 0, 0, rows_pad - (c1 - c0)))
            b0 = c0 // rows_per_block
            block_sel[b0 : b0 + rows_pad // rows_per_block] = sel.view(
                -1, rows_per_block, *sel.shape[1:]
            ).any(1)
        q_pages, q_count = _compact(block_sel)
        num_kv_blocks = -(-num_pages // pages_per_kv_block)
        kv_sel = torch.nn.functional.pad(block_sel, (0, num_kv_blocks * pages_per_kv_block - num_pages))
        kv_sel = kv_sel.view(num_blocks, num_kv_heads, num_kv_blocks, pages_per_kv_block).any(-1)
        kv_q_blocks, kv_count = _compact(kv_sel.permute(2, 1, 0))
    return Selection(row_bits, q_pages, q_count, kv_q_blocks, kv_count, rows_per_block, pages_per_kv_block)


@triton.jit
def _query_tile(qb, h, T, ROWS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    """Rows and query heads of the [ROWS * BLOCK_G] tile of query block qb and KV head h."""
    offs_m = tl.arange(0, ROWS * BLOCK_G)
    t = qb * ROWS + offs_m // BLOCK_G
    g = offs_m % BLOCK_G
    return t, h * GROUP + g, (g < GROUP) & (t < T)


@triton.jit
def _row_mask(RowBits, stride_rb_t, stride_rb_h, t, h, row_ok, page, pos, key_ok):
    """[M, N]: the row selected the key's page and the key is at or before the row (causal)."""
    byte = tl.load(
        RowBits + t[:, None].to(tl.int64) * stride_rb_t + h * stride_rb_h + page[None, :] // 8,
        mask=row_ok[:, None] & key_ok[None, :],
        other=0,
    ).to(tl.int32)
    bit = (byte >> (page[None, :] % 8)) & 1
    return (bit != 0) & row_ok[:, None] & key_ok[None, :] & (pos[None, :] <= t[:, None])


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    RowBits,
    QPages,
    QCount,
    Out,
    Lse,
    T,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_rb_t,
    stride_rb_h,
    stride_qp_b,
    stride_qp_h,
    stride_qc_b,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    sm_scale,
    ROWS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    t, heads, row_ok = _query_tile(qb, h, T, ROWS, GROUP, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_md = row_ok[:, None] & mask_d[None, :]
    q = tl.load(Q + t[:, None].to(tl.int64) * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :],
                mask=mask_md, other=0.0)  # fmt: skip
    BLOCK_N: tl.constexpr = PAGES_PER_BLOCK * PAGE_SIZE
    offs_n = tl.arange(0, BLOCK_N)
    n = tl.load(QCount + qb * stride_qc_b + h)
    table = QPages + qb.to(tl.int64) * stride_qp_b + h * stride_qp_h

    m_i = tl.full([ROWS * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS * BLOCK_G], tl.float32)
    acc = tl.zeros([ROWS * BLOCK_G, BLOCK_D], tl.float32)
    for p0 in range(0, n, PAGES_PER_BLOCK):
        idx = p0 + offs_n // PAGE_SIZE
        key_ok = idx < n
        page = tl.load(table + idx, mask=key_ok, other=0)
        pos = page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
        key_ok = key_ok & (pos < T)  # the last page may be partial
        valid = _row_mask(RowBits, stride_rb_t, stride_rb_h, t, h, row_ok, page, pos, key_ok)
        kv_mask = key_ok[:, None] & mask_d[None, :]
        k = tl.load(K + pos[:, None] * stride_k_t + h * stride_k_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + pos[:, None] * stride_v_t + h * stride_v_h + offs_d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), FP32_DOT) * sm_scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet stays at zero
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + t[:, None].to(tl.int64) * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_md)  # fmt: skip
    tl.store(Lse + t.to(tl.int64) * stride_lse_t + heads, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    RowBits,
    QPages,
    QCount,
    DQ,
    T,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_do_t,
    stride_do_h,
    stride_lse_t,
    stride_rb_t,
    stride_rb_h,
    stride_qp_b,
    stride_qp_h,
    stride_qc_b,
    stride_dq_t,
    stride_dq_h,
    sm_scale,
    ROWS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    t, heads, row_ok = _query_tile(qb, h, T, ROWS, GROUP, BLOCK_G)
    t64 = t.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_md = row_ok[:, None] & mask_d[None, :]
    q = tl.load(
        Q + t64[:, None] * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :], mask=mask_md, other=0.0
    )
    do = tl.load(DO + t64[:, None] * stride_do_t + heads[:, None] * stride_do_h + offs_d[None, :], mask=mask_md,
                 other=0.0)  # fmt: skip
    lse = tl.load(Lse + t64 * stride_lse_t + heads, mask=row_ok, other=0.0)
    delta = tl.load(Delta + t64 * stride_lse_t + heads, mask=row_ok, other=0.0)
    BLOCK_N: tl.constexpr = PAGES_PER_BLOCK * PAGE_SIZE
    offs_n = tl.arange(0, BLOCK_N)
    n = tl.load(QCount + qb * stride_qc_b + h)
    table = QPages + qb.to(tl.int64) * stride_qp_b + h * stride_qp_h

    dq = tl.zeros([ROWS * BLOCK_G, BLOCK_D], tl.float32)
    for p0 in range(0, n, PAGES_PER_BLOCK):
        idx = p0 + offs_n // PAGE_SIZE
        key_ok = idx < n
        page = tl.load(table + idx, mask=key_ok, other=0)
        pos = page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
        key_ok = key_ok & (pos < T)  # the last page may be partial
        valid = _row_mask(RowBits, stride_rb_t, stride_rb_h, t, h, row_ok, page, pos, key_ok)
        kv_mask = key_ok[:, None] & mask_d[None, :]
        k = tl.load(K + pos[:, None] * stride_k_t + h * stride_k_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + pos[:, None] * stride_v_t + h * stride_v_h + offs_d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), FP32_DOT) * sm_scale
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(v), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, FP32_DOT)
    tl.store(DQ + t64[:, None] * stride_dq_t + heads[:, None] * stride_dq_h + offs_d[None, :], dq * sm_scale,
             mask=mask_md)  # fmt: skip


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    RowBits,
    KvQBlocks,
    KvCount,
    DK,
    DV,
    T,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_do_t,
    stride_do_h,
    stride_lse_t,
    stride_rb_t,
    stride_rb_h,
    stride_kq_b,
    stride_kq_h,
    stride_kc_b,
    stride_dk_t,
    stride_dk_h,
    sm_scale,
    ROWS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGES_PER_BLOCK: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    kb = tl.program_id(0)
    h = tl.program_id(1)
    BLOCK_N: tl.constexpr = PAGES_PER_BLOCK * PAGE_SIZE
    offs_n = tl.arange(0, BLOCK_N)
    pos = kb.to(tl.int64) * BLOCK_N + offs_n
    page = pos // PAGE_SIZE
    key_ok = pos < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kv_mask = key_ok[:, None] & mask_d[None, :]
    k = tl.load(K + pos[:, None] * stride_k_t + h * stride_k_h + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + pos[:, None] * stride_v_t + h * stride_v_h + offs_d[None, :], mask=kv_mask, other=0.0)
    n = tl.load(KvCount + kb * stride_kc_b + h)
    blocks = KvQBlocks + kb.to(tl.int64) * stride_kq_b + h * stride_kq_h

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i in range(0, n):
        qb = tl.load(blocks + i)
        t, heads, row_ok = _query_tile(qb, h, T, ROWS, GROUP, BLOCK_G)
        t64 = t.to(tl.int64)
        mask_md = row_ok[:, None] & mask_d[None, :]
        q = tl.load(Q + t64[:, None] * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :], mask=mask_md,
                    other=0.0)  # fmt: skip
        do = tl.load(DO + t64[:, None] * stride_do_t + heads[:, None] * stride_do_h + offs_d[None, :],
                     mask=mask_md, other=0.0)  # fmt: skip
        lse = tl.load(Lse + t64 * stride_lse_t + heads, mask=row_ok, other=0.0)
        delta = tl.load(Delta + t64 * stride_lse_t + heads, mask=row_ok, other=0.0)
        valid = _row_mask(RowBits, stride_rb_t, stride_rb_h, t, h, row_ok, page, pos, key_ok)
        s = mma(q, tl.trans(k), FP32_DOT) * sm_scale
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)  # [M, N]
        dv += mma(tl.trans(p.to(do.dtype)), do, FP32_DOT)
        dp = mma(do, tl.trans(v), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dk += mma(tl.trans(ds.to(q.dtype)), q, FP32_DOT)
    out = pos[:, None] * stride_dk_t + h * stride_dk_h + offs_d[None, :]
    tl.store(DK + out, dk * sm_scale, mask=kv_mask)
    tl.store(DV + out, dv, mask=kv_mask)


class BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sel: Selection, scale, page_size, pages_per_block):
        seq_len, num_q_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_q_heads // num_kv_heads
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(seq_len, num_q_heads, dtype=torch.float32, device=q.device)
        meta = dict(
            ROWS=sel.rows_per_block,
            GROUP=group,
            BLOCK_G=next_pow2(group),
            HEAD_DIM=head_dim,
            BLOCK_D=next_pow2(head_dim, 16),
            PAGE_SIZE=page_size,
            PAGES_PER_BLOCK=pages_per_block,
            FP32_DOT=interpreting(),
        )
        _fwd_kernel[(sel.q_pages.shape[0], num_kv_heads)](
            q, k, v, sel.row_bits, sel.q_pages, sel.q_count, out, lse, seq_len,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            sel.row_bits.stride(0), sel.row_bits.stride(1), sel.q_pages.stride(0), sel.q_pages.stride(1),
            sel.q_count.stride(0), out.stride(0), out.stride(1), lse.stride(0), scale, **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sel, ctx.scale, ctx.meta = sel, scale, meta
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        sel, scale, meta = ctx.sel, ctx.scale, ctx.meta
        seq_len, num_kv_heads = q.shape[0], k.shape[1]
        do = grad_out.contiguous()
        delta = (do.float() * out.float()).sum(-1).contiguous()  # [T, Hq]
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
        _bwd_dq_kernel[(sel.q_pages.shape[0], num_kv_heads)](
            q, k, v, do, lse, delta, sel.row_bits, sel.q_pages, sel.q_count, dq, seq_len,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), lse.stride(0), sel.row_bits.stride(0), sel.row_bits.stride(1),
            sel.q_pages.stride(0), sel.q_pages.stride(1), sel.q_count.stride(0), dq.stride(0), dq.stride(1),
            scale, **meta,
        )  # fmt: skip
        kv_meta = dict(meta, PAGES_PER_BLOCK=sel.pages_per_kv_block)
        _bwd_dkdv_kernel[(sel.kv_q_blocks.shape[0], num_kv_heads)](
            q, k, v, do, lse, delta, sel.row_bits, sel.kv_q_blocks, sel.kv_count, dk, dv, seq_len,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), lse.stride(0), sel.row_bits.stride(0), sel.row_bits.stride(1),
            sel.kv_q_blocks.stride(0), sel.kv_q_blocks.stride(1), sel.kv_count.stride(0),
            dk.stride(0), dk.stride(1), scale, **kv_meta,
        )  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def rows_per_block(group: int) -> int:
    """Query positions per tile: R x next_pow2(G) query heads make a tile of about 128 rows on GPUs.

    Under the interpreter, tiles of one page keep the CPU tests fast.
    """
    target = 16 if interpreting() else 128
    return max(16, target // next_pow2(group))


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: Sequence[int | None] | torch.Tensor,
    geometry: PageGeometry = DEFAULT_GEOMETRY,
    scale: float | None = None,
    pages_per_block: int = 4,
    rows: int | None = None,
) -> torch.Tensor:
    """See the module docstring. Differentiable in q, k and v; the selection carries no gradient."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    budgets = budget_tensor(budgets, q.shape[0], q.device)
    _check_budgets(budgets, geometry)
    rows = rows_per_block(q.shape[1] // k.shape[1]) if rows is None else rows
    sel = select_blocks(q, k, budgets, geometry, rows, pages_per_block)
    return BlockSparseAttention.apply(q, k, v, sel, scale, geometry.page_size, pages_per_block)
