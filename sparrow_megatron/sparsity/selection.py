"""The block top-k page-selection rule (sink pages + local pages + the top-scoring middle pages under
the token budget), written once.

Every implementation of sparse decode—the torch reference, the Triton kernels, the SGLang backend and
the trainer's sparse forward for DistillSparse—takes its page plan, landmarks, scores and tie-breaking
from here, and the tests check that they agree with it.

Definitions, for one request whose KV cache holds `total_len` tokens (prompt + generated so far,
including the token being decoded, whose K/V is written before attention):
- logical page i holds tokens [i*P, (i+1)*P); there are ceil(L/P) pages, the last possibly partial;
- a full page's landmark, per KV head, is the mean of its P post-RoPE keys, accumulated in fp32 and
  stored in the KV cache dtype;
- if `budget` is None or L <= budget: dense, every page is attended;
- else keep the `sink` leading pages, the `local` trailing pages (a partial current page is one of
  them) and the top k = budget/P - sink - local of the remaining pages, ranked by
  score = mean over the G query heads of the KV group of q, dotted with the landmark (fp32, no softmax,
  no scale); ties go to the lower page index. All G query heads of the group share the selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PageGeometry:
    page_size: int = 16
    sink_pages: int = 1
    local_pages: int = 2

    @property
    def min_budget(self) -> int:
        """The smallest budget that still holds the sink and local pages."""
        return (self.sink_pages + self.local_pages) * self.page_size


DEFAULT_GEOMETRY = PageGeometry()


@dataclass(frozen=True)
class PagePlan:
    """What the rule decides before looking at any score."""

    dense: bool
    num_pages: int
    top_k: int  # pages picked by score (0 when dense)
    candidate_start: int  # candidate pages are [candidate_start, candidate_end)
    candidate_end: int

    @property
    def num_selected(self) -> int:
        return self.num_pages if self.dense else self.top_k + self.sink_and_local

    @property
    def sink_and_local(self) -> int:
        return self.candidate_start + (self.num_pages - self.candidate_end)


def num_pages(total_len: int, page_size: int) -> int:
    return -(-total_len // page_size)


def plan_pages(total_len: int, budget: int | None, geometry: PageGeometry = DEFAULT_GEOMETRY) -> PagePlan:
    """The page plan for a request of `total_len` cached tokens under `budget` tokens (None = dense)."""
    if total_len <= 0:
        raise ValueError(f"total_len must be positive, got {total_len}")
    n = num_pages(total_len, geometry.page_size)
    if budget is None or total_len <= budget:
        return PagePlan(dense=True, num_pages=n, top_k=0, candidate_start=0, candidate_end=0)
    if budget % geometry.page_size or budget < geometry.min_budget:
        raise ValueError(
            f"budget {budget} must be a multiple of page_size {geometry.page_size} "
            f"and at least {geometry.min_budget} (sink + local pages)"
        )
    top_k = budget // geometry.page_size - geometry.sink_pages - geometry.local_pages
    # L > budget guarantees more candidates than top_k, so exactly budget/P pages are selected.
    return PagePlan(
        dense=False,
        num_pages=n,
        top_k=top_k,
        candidate_start=geometry.sink_pages,
        candidate_end=n - geometry.local_pages,
    )


def compute_landmarks(keys: torch.Tensor, page_size: int = 16) -> torch.Tensor:
    """Landmarks of the full pages of one request: keys [L, Hkv, D] -> [L // P, Hkv, D].

    fp32 accumulation, stored in the keys' dtype (what the KV cache holds).
    """
    n_full = keys.shape[0] // page_size
    pages = keys[: n_full * page_size].reshape(n_full, page_size, *keys.shape[1:])
    return pages.float().mean(dim=1).to(keys.dtype)


def group_mean_query(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [..., Hq, D] -> fp32 mean over each KV group's query heads, [..., Hkv, D].

    Query head h belongs to KV group h // G (the GQA layout of HF, SGLang and Megatron).
    """
    *lead, hq, d = q.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    return q.float().reshape(*lead, num_kv_heads, hq // num_kv_heads, d).mean(dim=-2)


def score_pages(q_group_mean: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Scores of pages: q_group_mean [..., Hkv, D] fp32, landmarks [N, Hkv, D] -> [..., Hkv, N] fp32."""
    return torch.einsum("...hd,nhd->...hn", q_group_mean.float(), landmarks.float())


def top_k_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores per row, ties to the lower index: [H, N] -> [H, k] (by rank).

    A stable descending sort is the documented tie-break every implementation must reproduce.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def select_pages(
    q_group_mean: torch.Tensor,
    landmarks: torch.Tensor,
    total_len: int,
    budget: int | None,
    geometry: PageGeometry = DEFAULT_GEOMETRY,
) -> torch.Tensor:
    """The selected page ids of one request, per KV head, ascending: [Hkv, n_selected] int64.

    `landmarks` holds at least the full pages of the request ([>= L // P, Hkv, D]); only the candidate
    pages' landmarks are read. Leading dims of q_group_mean ([..., Hkv, D]: several queries against
    the same cache and plan) carry through to the result.
    """
    lead = q_group_mean.shape[:-1]  # [..., Hkv]
    plan = plan_pages(total_len, budget, geometry)
    device = q_group_mean.device
    if plan.dense:
        return torch.arange(plan.num_pages, device=device).expand(*lead, -1).clone()
    candidates = landmarks[plan.candidate_start : plan.candidate_end]
    chosen = top_k_pages(score_pages(q_group_mean, candidates), plan.top_k) + plan.candidate_start
    sink = torch.arange(plan.candidate_start, device=device).expand(*lead, -1)
    local = torch.arange(plan.candidate_end, plan.num_pages, device=device).expand(*lead, -1)
    return torch.cat([sink, chosen, local], dim=-1).sort(dim=-1).values


def pages_to_token_mask(pages: torch.Tensor, total_len: int, page_size: int = 16) -> torch.Tensor:
    """[..., Hkv, n_sel] page ids -> [..., Hkv, L] bool mask of the tokens those pages cover."""
    mask = torch.zeros(
        *pages.shape[:-1], num_pages(total_len, page_size), dtype=torch.bool, device=pages.device
    )
    mask.scatter_(-1, pages, True)
    return mask.repeat_interleave(page_size, dim=-1)[..., :total_len]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
