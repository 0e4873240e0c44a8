import pytest
import torch
from sparrow_kernels.training_attention import (
    block_sparse_attention,
    budget_tensor,
    fixed_budgets,
    plan_rows,
    select_blocks,
)

from sparrow_megatron.sparsity.reference import position_budgets, sparse_causal_attention_reference
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY, plan_pages
from tests.kernels.pool import DEVICE

BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def _inputs(seq_len, num_kv_heads, group, head_dim, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (seq_len, num_kv_heads * group, head_dim),
        (seq_len, num_kv_heads, head_dim),
        (seq_len, num_kv_heads, head_dim),
    ]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _schedule():
    # 48 tokens (sink + local only, k = 0) below position 80, then 80 (k = 2): the budget changes along
    # the sequence and both bins have sparse positions
    return Schedule(budgets=(48, 80), bin_width=80)


def test_device_plan_equals_the_rule():
    seq_len = 200
    budgets = position_budgets(_schedule(), 30, seq_len)
    plan = plan_rows(budget_tensor(budgets, seq_len), 0, seq_len, DEFAULT_GEOMETRY)
    for t in range(seq_len):
        want = plan_pages(t + 1, budgets[t])
        got = (int(plan.num_pages[t]), int(plan.num_selected[t]), int(plan.top_k[t]))
        assert got == (want.num_pages, want.num_selected, -1 if want.dense else want.top_k), t
        if not want.dense:
            assert (int(plan.cand_start[t]), int(plan.cand_end[t])) == (
                want.candidate_start,
                want.candidate_end,
            )
    assert plan.max_selected >= int(plan.num_selected.max())


@pytest.mark.parametrize(("num_kv_heads", "group", "head_dim", "rows"), [(2, 2, 64, 16), (1, 5, 128, 32)])
def test_selection_equals_reference_mask(num_kv_heads, group, head_dim, rows):
    seq_len, prompt = 110, 20
    q, k, _ = _inputs(seq_len, num_kv_heads, group, head_dim, seed=group)
    budgets = position_budgets(_schedule(), prompt, seq_len)
    _, want_mask = sparse_causal_attention_reference(q, k, k, budgets)  # [Hkv, T, T]
    sel = select_blocks(
        q.to(DEVICE), k.to(DEVICE), budget_tensor(budgets, seq_len, DEVICE), rows_per_block=rows
    )
    bits = sel.row_bits.cpu().long()  # [T, Hkv, bytes]
    pages = torch.arange(bits.shape[2] * 8)
    page_sel = (bits[..., pages // 8] >> (pages % 8)) & 1  # [T, Hkv, pages]
    token_sel = page_sel.bool().repeat_interleave(16, -1)[..., :seq_len]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    assert torch.equal(token_sel & causal[:, None], want_mask.transpose(0, 1))
    # the block unions hold every page a row of the block selected, and nothing else
    for b in range(sel.q_pages.shape[0]):
        for h in range(num_kv_heads):
            union = page_sel[b * rows : (b + 1) * rows, h].any(0).nonzero().flatten()
            got = sel.q_pages[b, h, : int(sel.q_count[b, h])].cpu().long()
            assert torch.equal(got, union), (b, h)
    # the inverted index: KV block j lists the query blocks whose union meets its pages
    for j in range(sel.kv_q_blocks.shape[0]):
        for h in range(num_kv_heads):
            want = [
                b
                for b in range(sel.q_pages.shape[0])
                if ((sel.q_pages[b, h, : int(sel.q_count[b, h])].cpu() // 4) == j).any()
            ]
            assert sel.kv_q_blocks[j, h, : int(sel.kv_count[j, h])].cpu().tolist() == want, (j, h)
    assert (page_sel.sum(-1) < (torch.arange(seq_len) // 16 + 1)[:, None]).sum() > 50  # sparse rows


@pytest.mark.parametrize(("num_kv_heads", "group", "head_dim"), [(1, 4, 64), (1, 8, 128)])
def test_forward_and_backward_match_reference_autograd(num_kv_heads, group, head_dim):
    seq_len, prompt = 107, 17
    inputs = _inputs(seq_len, num_kv_heads, group, head_dim, seed=head_dim + group)
    budgets = position_budgets(_schedule(), prompt, seq_len)
    grad_out = torch.randn(
        seq_len, num_kv_heads * group, head_dim, generator=torch.Generator().manual_seed(7)
    )

    # bf16 leaves: the reference's landmarks are then stored in bf16 like the kernel's (its math is fp32)
    ref_in = [x.clone().requires_grad_() for x in inputs]
    want, _ = sparse_causal_attention_reference(*ref_in, budgets)
    (want * grad_out).sum().backward()

    got_in = [x.clone().to(DEVICE).requires_grad_() for x in inputs]
    got = block_sparse_attention(*got_in, budgets)
    (got.float() * grad_out.to(DEVICE)).sum().backward()

    torch.testing.assert_close(got.cpu().float(), want.detach().float(), **BF16_TOL)
    for name, a, b in zip("qkv", got_in, ref_in, strict=True):
        torch.testing.assert_close(
            a.grad.cpu().float(), b.grad.float(), **BF16_TOL, msg=lambda m, n=name: f"d{n}: {m}"
        )


def test_fixed_budget_mode_equals_reference_with_one_budget():
    seq_len, prompt, budget = 72, 20, 48
    q, k, v = _inputs(seq_len, 1, 2, 32, seed=11, dtype=torch.float32)
    budgets = fixed_budgets(prompt, seq_len, budget)
    assert budgets.tolist() == [-1] * prompt + [budget] * (seq_len - prompt)
    want, _ = sparse_causal_attention_reference(q, k, v, [None] * prompt + [budget] * (seq_len - prompt))
    got = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), budgets.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_bad_budget_is_refused():
    q, k, v = _inputs(64, 1, 2, 64, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of page_size"):
        block_sparse_attention(q, k, v, [None] * 40 + [40] * 24)


def test_dense_budget_is_causal_attention():
    seq_len = 45
    q, k, v = _inputs(seq_len, 1, 2, 64, seed=3, dtype=torch.float32)
    got = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), [None] * seq_len)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
