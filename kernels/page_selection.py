"""Page scoring and top-k page selection for a batch of decode requests (or teacher-forced rows).

The rule is `sparrow_megatron.sparsity.selection`: the per-request page plan (dense or not, candidate
range, k) comes from its `plan_pages`; these kernels implement its math on the GPU:

- `score_pages`: scores[b, h, i] = group_mean_query(q[b])[h] . landmarks[req_b, cand_start_b + i, h]
  in fp32, no scale; one program per (request, KV head, block of candidates), so every landmark is read
  once for the whole query group. Padding past a request's candidates is -inf.
- `top_k_pages`: per (request, KV head), the k best candidates with ties to the LOWER page index (the
  rule's stable descending sort), with no upper limit on the number of pages: the k-th largest score is
  found by bisection on the order-preserving integer image of the fp32 scores (32 counting passes), then
  one pass writes sink + chosen + local pages in ascending page order; up to `small_n` candidates, each
  candidate's rank is counted from all pairs in one tile instead. Dense requests get 0..n-1.

Layouts: q [B, Hq, D]; landmarks [pool_size, max_pages, Hkv, D] (see `landmarks.py`); scores
[B, Hkv, max_candidates] fp32; page_table [B, Hkv, max_selected] int32 (ascending page ids, the first
num_selected[b] entries valid); num_selected [B] int32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from sparrow_kernels._common import next_pow2

from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY, PageGeometry, plan_pages


@dataclass
class BatchPlan:
    """`plan_pages` for every request of a batch, as device tensors for the kernels."""

    num_pages: torch.Tensor  # [B] int32
    cand_start: torch.Tensor  # [B] int32
    cand_end: torch.Tensor  # [B] int32 (== cand_start for dense requests)
    top_k: torch.Tensor  # [B] int32 (-1 for dense requests; 0 is a valid sparse k)
    num_selected: torch.Tensor  # [B] int32
    max_candidates: int
    max_selected: int
    all_dense: bool


def plan_batch(
    seq_lens: Sequence[int],
    budgets: Sequence[int | None] | int | None,
    geometry: PageGeometry = DEFAULT_GEOMETRY,
    device: torch.device | str = "cpu",
) -> BatchPlan:
    """Plan each request with the rule's `plan_pages` (host side: lengths and budgets are host data)."""
    if not isinstance(budgets, Sequence):
        budgets = [budgets] * len(seq_lens)
    if len(budgets) != len(seq_lens):
        raise ValueError(f"{len(budgets)} budgets for {len(seq_lens)} requests")
    plans = [plan_pages(int(n), b, geometry) for n, b in zip(seq_lens, budgets, strict=True)]
    rows = [
        (
            p.num_pages,
            p.candidate_start,
            p.candidate_end if not p.dense else p.candidate_start,
            -1 if p.dense else p.top_k,
            p.num_selected,
        )
        for p in plans
    ]
    t = torch.tensor(rows, dtype=torch.int32).reshape(-1, 5).to(device)
    return BatchPlan(
        num_pages=t[:, 0].contiguous(),
        cand_start=t[:, 1].contiguous(),
        cand_end=t[:, 2].contiguous(),
        top_k=t[:, 3].contiguous(),
        num_selected=t[:, 4].contiguous(),
        max_candidates=max([r[2] - r[1] for r in rows], default=0),
        max_selected=max([r[4] for r in rows], default=0),
        all_dense=all(p.dense for p in plans),
    )


@triton.jit
def _score_kernel(
    Q,
    Landmarks,
    ReqPoolIdx,
    CandStart,
    CandEnd,
    Scores,
    PhysPages,
    stride_pp_b,
    stride_q_b,
    stride_q_h,
    stride_lm_row,
    stride_lm_page,
    stride_lm_head,
    stride_s_b,
    stride_s_h,
    width,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PHYSICAL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(CandStart + b)
    num_cand = tl.load(CandEnd + b) - start
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_q_b + (h * GROUP + offs_g[:, None]) * stride_q_h + offs_d[None, :],
        mask=(offs_g[:, None] < GROUP) & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    q_mean = tl.sum(q, axis=0) / GROUP
    valid = offs < num_cand
    pages = (start + offs).to(tl.int64)
    if PHYSICAL:  # landmarks [num_phys_pages, Hkv, D] through the row's logical -> physical page table
        req = tl.zeros((), tl.int64)
        pages = tl.load(PhysPages + b * stride_pp_b + pages, mask=valid, other=0).to(tl.int64)
    else:
        req = tl.load(ReqPoolIdx + b).to(tl.int64)
    lm = tl.load(
        Landmarks
        + req * stride_lm_row
        + pages[:, None] * stride_lm_page
        + h * stride_lm_head
        + offs_d[None, :],
        mask=valid[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    s = tl.sum(lm * q_mean[None, :], axis=1)
    tl.store(
        Scores + b * stride_s_b + h * stride_s_h + offs, tl.where(valid, s, float("-inf")), mask=offs < width
    )


def score_pages(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    req_pool_indices: torch.Tensor,
    plan: BatchPlan,
    block_n: int = 128,
    phys_pages: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of every candidate page: [B, Hkv, max_candidates] fp32 (-inf past a request's candidates).

    With `phys_pages` [B, W] (logical -> physical page per row), `landmarks` is per physical page,
    [num_pages, Hkv, D] (the SGLang backend's buffer), and `req_pool_indices` is not read.
    """
    batch, num_q_heads, head_dim = q.shape
    if phys_pages is not None:
        landmarks = landmarks.unsqueeze(0)
    num_kv_heads = landmarks.shape[2]
    group = num_q_heads // num_kv_heads
    width = max(plan.max_candidates, 1)
    scores = torch.empty(batch, num_kv_heads, width, dtype=torch.float32, device=q.device)
    if plan.max_candidates == 0 or batch == 0:
        return scores.fill_(float("-inf"))
    assert q.stride(2) == 1 and landmarks.stride(3) == 1
    grid = (batch, num_kv_heads, triton.cdiv(width, block_n))
    _score_kernel[grid](
        q,
        landmarks,
        req_pool_indices,
        plan.cand_start,
        plan.cand_end,
        scores,
        landmarks if phys_pages is None else phys_pages,
        0 if phys_pages is None else phys_pages.stride(0),
        q.stride(0),
        q.stride(1),
        landmarks.stride(0),
        landmarks.stride(1),
        landmarks.stride(2),
        scores.stride(0),
        scores.stride(1),
        width,
        GROUP=group,
        BLOCK_G=next_pow2(group),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim, 16),
        BLOCK_N=block_n,
        PHYSICAL=phys_pages is not None,
    )
    return scores


@triton.jit
def _ordered_key(s):
    """fp32 -> int64 with the same order (signed-magnitude -> two's complement); -0.0 counts as +0.0."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _topk_kernel(
    Scores,
    NumPages,
    CandStart,
    CandEnd,
    TopK,
    PageTable,
    stride_s_b,
    stride_s_h,
    stride_p_b,
    stride_p_h,
    BLOCK_N: tl.constexpr,
    SMALL_N: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_pages = tl.load(NumPages + b)
    start = tl.load(CandStart + b)
    end = tl.load(CandEnd + b)
    k = tl.load(TopK + b)
    num_cand = end - start
    row = Scores + b * stride_s_b + h * stride_s_h
    out = PageTable + b * stride_p_b + h * stride_p_h
    offs = tl.arange(0, BLOCK_N)
    if k < 0:
        # dense request: every page, in order
        for p0 in range(0, num_pages, BLOCK_N):
            tl.store(out + p0 + offs, p0 + offs, mask=p0 + offs < num_pages)
    else:
        for p0 in range(0, start, BLOCK_N):  # sink pages first
            tl.store(out + p0 + offs, p0 + offs, mask=p0 + offs < start)
        if num_cand <= SMALL_N:
            # Few candidates: each one's rank in the stable descending order, from all pairs at once.
            offs_s = tl.arange(0, SMALL_N)
            valid = offs_s < num_cand
            key = _ordered_key(tl.load(row + offs_s, mask=valid, other=0.0)).to(tl.int32)  # fits: int32 image
            key_i = key[:, None]
            key_j = key[None, :]
            earlier = offs_s[None, :] < offs_s[:, None]
            beats = valid[None, :] & ((key_j > key_i) | ((key_j == key_i) & earlier))
            rank = tl.sum(beats.to(tl.int32), axis=1)
            chosen = valid & (rank < k)
            chosen_i = chosen.to(tl.int32)
            tl.store(out + start + tl.cumsum(chosen_i, axis=0) - chosen_i, start + offs_s, mask=chosen)
        else:
            # The k-th largest key: the largest t with count(key >= t) >= k, by bisection over int32.
            lo = tl.full((), -2147483648, tl.int64)
            hi = tl.full((), 2147483647, tl.int64)
            for _ in range(32):
                mid = lo + (hi - lo + 1) // 2
                count = tl.zeros((), tl.int32)
                for c0 in range(0, num_cand, BLOCK_N):
                    valid = c0 + offs < num_cand
                    key = _ordered_key(tl.load(row + c0 + offs, mask=valid, other=0.0))
                    count += tl.sum((valid & (key >= mid)).to(tl.int32), axis=0)
                take = count >= k
                lo = tl.where(take, mid, lo)
                hi = tl.where(take, hi, mid - 1)
            threshold = lo
            above = tl.zeros((), tl.int32)
            for c0 in range(0, num_cand, BLOCK_N):
                valid = c0 + offs < num_cand
                key = _ordered_key(tl.load(row + c0 + offs, mask=valid, other=0.0))
                above += tl.sum((valid & (key > threshold)).to(tl.int32), axis=0)
            ties_wanted = k - above
            # the chosen candidates in page order: all above the threshold, the first ties_wanted ties
            written = tl.zeros((), tl.int32)
            ties_seen = tl.zeros((), tl.int32)
            for c0 in range(0, num_cand, BLOCK_N):
                valid = c0 + offs < num_cand
                key = _ordered_key(tl.load(row + c0 + offs, mask=valid, other=0.0))
                tie = (valid & (key == threshold)).to(tl.int32)
                tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
                chosen = (valid & (key > threshold)) | ((tie == 1) & (tie_rank < ties_wanted))
                chosen_i = chosen.to(tl.int32)
                slot = written + tl.cumsum(chosen_i, axis=0) - chosen_i
                tl.store(out + start + slot, start + c0 + offs, mask=chosen)
                written += tl.sum(chosen_i, axis=0)
                ties_seen += tl.sum(tie, axis=0)
        for p0 in range(end, num_pages, BLOCK_N):
            p = p0 + offs
            tl.store(out + start + k + (p - end), p, mask=p < num_pages)


def top_k_pages(
    scores: torch.Tensor, plan: BatchPlan, block_n: int = 1024, small_n: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """(page_table [B, Hkv, max_selected] int32 ascending, num_selected [B] int32) from the scores."""
    batch, num_kv_heads, _ = scores.shape
    page_table = torch.empty(
        batch, num_kv_heads, max(plan.max_selected, 1), dtype=torch.int32, device=scores.device
    )
    if batch:
        _topk_kernel[(batch, num_kv_heads)](
            scores,
            plan.num_pages,
            plan.cand_start,
            plan.cand_end,
            plan.top_k,
            page_table,
            scores.stride(0),
            scores.stride(1),
            page_table.stride(0),
            page_table.stride(1),
            BLOCK_N=block_n,
            SMALL_N=small_n,
        )
    return page_table, plan.num_selected


def select_pages(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    req_pool_indices: torch.Tensor,
    plan: BatchPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring then top-k: (page_table, num_selected) for the attention kernel."""
    return top_k_pages(score_pages(q, landmarks, req_pool_indices, plan), plan)
