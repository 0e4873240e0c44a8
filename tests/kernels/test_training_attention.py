import pytest
import torch
from sparrow_kernels.training_attention import block_sparse_attention, select_rows

from sparrow_megatron.sparsity.reference import position_budgets, sparse_causal_attention_reference
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import pages_to_token_mask
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


@pytest.mark.parametrize(("num_kv_heads", "group", "head_dim"), [(2, 2, 64), (1, 5, 128)])
def test_selection_equals_reference_mask(num_kv_heads, group, head_dim):
    seq_len, prompt = 110, 20
    q, k, _ = _inputs(seq_len, num_kv_heads, group, head_dim, seed=group)
    budgets = position_budgets(_schedule(), prompt, seq_len)
    _, want_mask = sparse_causal_attention_reference(q, k, k, budgets)
    row_of, table, count = select_rows(q.to(DEVICE), k.to(DEVICE), budgets)
    row_of, table, count = row_of.cpu(), table.cpu(), count.cpu()
    for t in range(seq_len):
        r = int(row_of[t])
        if r < 0:
            assert want_mask[:, t, : t + 1].all(), f"query {t} is dense in the kernel only"
            continue
        got = pages_to_token_mask(table[r, :, : int(count[r])].long(), t + 1)
        assert torch.equal(got, want_mask[:, t, : t + 1]), f"query {t}"
    assert (row_of >= 0).sum() > 50 and (count.max() > 3).item()  # most decode positions are sparse


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


def test_dense_budget_is_causal_attention():
    seq_len = 45
    q, k, v = _inputs(seq_len, 1, 2, 64, seed=3, dtype=torch.float32)
    got = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), [None] * seq_len)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
