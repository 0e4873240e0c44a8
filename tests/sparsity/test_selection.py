import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_megatron.sparsity.selection import (
    PageGeometry,
    compute_landmarks,
    group_mean_query,
    pages_to_token_mask,
    plan_pages,
    select_pages,
    top_k_pages,
)

GEOM = PageGeometry(page_size=16, sink_pages=1, local_pages=2)


@settings(max_examples=200, deadline=None)
@given(total_len=st.integers(1, 5000), budget_pages=st.integers(3, 100))
def test_plan_selects_exactly_budget_pages_when_sparse(total_len, budget_pages):
    budget = budget_pages * 16
    plan = plan_pages(total_len, budget, GEOM)
    n = -(-total_len // 16)
    assert plan.num_pages == n
    if total_len <= budget:
        assert plan.dense and plan.num_selected == n
    else:
        assert not plan.dense
        assert plan.num_selected == budget_pages
        assert plan.candidate_end - plan.candidate_start > plan.top_k


def test_plan_rejects_budget_off_the_page_grid():
    with pytest.raises(ValueError, match="multiple of page_size"):
        plan_pages(1000, 100, GEOM)
    with pytest.raises(ValueError, match="at least 48"):
        plan_pages(1000, 32, GEOM)


def test_landmark_is_fp32_mean_of_full_pages_only():
    keys = torch.randn(50, 2, 8, dtype=torch.bfloat16)
    marks = compute_landmarks(keys, 16)
    assert marks.shape == (3, 2, 8) and marks.dtype == torch.bfloat16
    expected = keys[16:32].float().mean(0).to(torch.bfloat16)
    assert torch.equal(marks[1], expected)


def test_group_mean_query_uses_consecutive_heads_per_group():
    q = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)  # 4 heads, 2 KV groups
    qbar = group_mean_query(q, 2)
    assert torch.equal(qbar, torch.stack([q[0:2].mean(0), q[2:4].mean(0)]))


def test_ties_go_to_the_lower_page_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]])
    assert top_k_pages(scores, 2).tolist() == [[1, 2]]


@settings(max_examples=60, deadline=None)
@given(
    total_len=st.integers(49, 700),
    budget_pages=st.integers(3, 20),
    kv_heads=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_selection_keeps_sink_and_local_and_matches_brute_force(total_len, budget_pages, kv_heads, seed):
    g = torch.Generator().manual_seed(seed)
    budget = budget_pages * 16
    keys = torch.randn(total_len, kv_heads, 8, generator=g)
    qbar = torch.randn(kv_heads, 8, generator=g)
    marks = compute_landmarks(keys, 16)
    pages = select_pages(qbar, marks, total_len, budget, GEOM)
    n = -(-total_len // 16)
    for h in range(kv_heads):
        chosen = set(pages[h].tolist())
        if total_len <= budget:
            assert chosen == set(range(n))
            continue
        assert len(chosen) == budget_pages == pages.shape[1]
        assert {0, n - 2, n - 1} <= chosen
        # brute force: score every candidate page by hand, best first, ties to the lower index
        cands = range(1, n - 2)
        ranked = sorted(cands, key=lambda i: (-float(marks[i, h] @ qbar[h]), i))
        assert chosen == {0, n - 2, n - 1} | set(ranked[: budget_pages - 3])


def test_token_mask_covers_selected_pages_and_stops_at_length():
    pages = torch.tensor([[0, 2]])
    mask = pages_to_token_mask(pages, 40, 16)
    assert mask.shape == (1, 40)
    assert mask[0, :16].all() and not mask[0, 16:32].any() and mask[0, 32:].all()
