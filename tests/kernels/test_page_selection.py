import pytest
import torch
from sparrow_kernels.page_selection import plan_batch, score_pages, select_pages, top_k_pages

from sparrow_megatron.sparsity import selection as rule
from tests.kernels.pool import DEVICE


def _landmark_pool(num_pages, num_kv_heads, head_dim, gen, pool_size=3):
    return torch.randn(pool_size, num_pages, num_kv_heads, head_dim, generator=gen).to(torch.bfloat16)


def _check_selection(q, marks, rows, lengths, budgets):
    plan = plan_batch(lengths, budgets, device=DEVICE)
    table, count = select_pages(q.to(DEVICE), marks.to(DEVICE), rows.to(DEVICE), plan)
    num_kv_heads = marks.shape[2]
    for b, n in enumerate(lengths):
        want = rule.select_pages(rule.group_mean_query(q[b], num_kv_heads), marks[rows[b]], n, budgets[b])
        got = table[b, :, : int(count[b])].cpu().long()
        assert torch.equal(got, want), f"request {b} (L={n}, budget={budgets[b]})"


@pytest.mark.parametrize(("group", "head_dim"), [(2, 64), (5, 128)])
def test_scores_match_rule(group, head_dim):
    gen = torch.Generator().manual_seed(group)
    num_kv_heads, lengths, budgets = 2, [300, 77, 161], [64, 64, 128]
    marks = _landmark_pool(20, num_kv_heads, head_dim, gen)
    q = torch.randn(3, num_kv_heads * group, head_dim, generator=gen).to(torch.bfloat16)
    rows = torch.tensor([2, 0, 1], dtype=torch.int32)
    plan = plan_batch(lengths, budgets, device=DEVICE)
    scores = score_pages(q.to(DEVICE), marks.to(DEVICE), rows.to(DEVICE), plan, block_n=16).cpu()
    for b, n in enumerate(lengths):
        p = rule.plan_pages(n, budgets[b])
        cands = marks[rows[b], p.candidate_start : p.candidate_end]
        want = rule.score_pages(rule.group_mean_query(q[b], num_kv_heads), cands)
        ncand = p.candidate_end - p.candidate_start
        torch.testing.assert_close(scores[b, :, :ncand], want, rtol=1e-5, atol=1e-4)
        assert torch.isinf(scores[b, :, ncand:]).all()


def test_selected_pages_equal_rule_mixed_batch():
    """Sparse and dense requests in one batch; lengths not multiples of 16; several budgets."""
    gen = torch.Generator().manual_seed(0)
    lengths = [300, 77, 129, 40, 48, 49]
    budgets = [64, 64, 96, 64, None, 48]
    marks = _landmark_pool(19, 2, 64, gen, pool_size=6)
    q = torch.randn(len(lengths), 8, 64, generator=gen).to(torch.bfloat16)
    _check_selection(q, marks, torch.tensor([5, 3, 1, 0, 2, 4], dtype=torch.int32), lengths, budgets)


def test_ties_go_to_the_lower_page():
    """Identical landmarks give exactly equal scores; the kernel breaks ties like the rule's stable sort."""
    gen = torch.Generator().manual_seed(1)
    base = _landmark_pool(6, 2, 64, gen, pool_size=1)
    marks = base.repeat(1, 5, 1, 1)[:, :30]  # pages i and i + 6 share a landmark
    marks[:, 20:23] = 0  # exact 0.0 scores tie too (with -0.0 possible from the dot)
    q = torch.randn(2, 4, 64, generator=gen).to(torch.bfloat16)
    _check_selection(q, marks, torch.tensor([0, 0], dtype=torch.int32), [480, 333], [160, 112])


def test_top_k_has_no_page_limit_128k_context():
    """128K tokens = 8192 pages (the reference implementation's 4096-page limit does not apply)."""
    gen = torch.Generator().manual_seed(2)
    lengths, budgets = [131072, 131072 - 5], [4096, 8192]
    marks = _landmark_pool(8192, 1, 64, gen, pool_size=1)
    q = torch.randn(2, 2, 64, generator=gen).to(torch.bfloat16)
    _check_selection(q, marks, torch.tensor([0, 0], dtype=torch.int32), lengths, budgets)


def test_top_k_from_given_scores_with_many_ties():
    """Top-k alone on hand-made scores: heavy ties, negatives, +-0.0."""
    gen = torch.Generator().manual_seed(3)
    lengths, budgets = [16 * 700 + 3, 16 * 90], [16 * 40, 16 * 20]
    plan = plan_batch(lengths, budgets, device=DEVICE)
    scores = torch.randint(-3, 4, (2, 3, plan.max_candidates), generator=gen).float()
    scores[:, :, ::7] = -0.0
    for b in range(2):
        scores[b, :, lengths[b] // 16 - 2 :] = float("-inf")  # padding past the candidates
    table, count = top_k_pages(scores.to(DEVICE), plan, block_n=256)
    for b, n in enumerate(lengths):
        p = rule.plan_pages(n, budgets[b])
        ncand = p.candidate_end - p.candidate_start
        chosen = rule.top_k_pages(scores[b, :, :ncand], p.top_k) + p.candidate_start
        sink = torch.arange(p.candidate_start).expand(3, -1)
        local = torch.arange(p.candidate_end, p.num_pages).expand(3, -1)
        want = torch.cat([sink, chosen, local], dim=-1).sort(dim=-1).values
        assert torch.equal(table[b, :, : int(count[b])].cpu().long(), want)
