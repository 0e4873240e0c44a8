import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_megatron.sparsity.reference import sparse_decode_reference
from sparrow_megatron.sparsity.selection import (
    compute_landmarks,
    group_mean_query,
    pages_to_token_mask,
    select_pages,
)


def _dense_sdpa(q, k, v):
    """Independent dense GQA attention for one request: q [Hq, D], k/v [L, Hkv, D]."""
    group = q.shape[0] // k.shape[1]
    kk = k.transpose(0, 1).repeat_interleave(group, 0)
    vv = v.transpose(0, 1).repeat_interleave(group, 0)
    return F.scaled_dot_product_attention(q[:, None, :], kk, vv)[:, 0]


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    group=st.sampled_from([1, 2, 4, 5]),
    seed=st.integers(0, 2**16),
)
def test_budget_at_least_length_equals_dense_attention(lengths, group, seed):
    g = torch.Generator().manual_seed(seed)
    kv_heads, d = 2, 16
    q = torch.randn(len(lengths), kv_heads * group, d, generator=g, dtype=torch.float64).float()
    keys = [torch.randn(n, kv_heads, d, generator=g) for n in lengths]
    values = [torch.randn(n, kv_heads, d, generator=g) for n in lengths]
    out, pages = sparse_decode_reference(q, keys, values, [max(lengths) // 16 * 16 + 16] * len(lengths))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b], _dense_sdpa(q[b], keys[b], values[b]), atol=1e-6, rtol=1e-6)
        assert pages[b].shape[1] == -(-n // 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_output_equals_attention_over_selected_tokens(dtype):
    g = torch.Generator().manual_seed(3)
    n, kv_heads, group, d, budget = 333, 2, 4, 32, 96
    q = torch.randn(1, kv_heads * group, d, generator=g).to(dtype)
    k = torch.randn(n, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(n, kv_heads, d, generator=g).to(dtype)
    out, (pages,) = sparse_decode_reference(q, [k], [v], budget)
    assert pages.shape == (kv_heads, budget // 16)
    # GQA: all query heads of a group share the selection made from the group-mean query
    expected_pages = select_pages(group_mean_query(q[0], kv_heads), compute_landmarks(k), n, budget)
    assert torch.equal(pages, expected_pages)
    for h in range(kv_heads):
        tokens = torch.cat([torch.arange(p * 16, min(p * 16 + 16, n)) for p in pages[h].tolist()])
        ref = _dense_sdpa(
            q[0, h * group : (h + 1) * group].float(),
            k[tokens][:, h : h + 1].float(),
            v[tokens][:, h : h + 1].float(),
        )
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[0, h * group : (h + 1) * group].float(), ref, atol=tol, rtol=tol)
    assert out.dtype == dtype


def test_sparse_differs_from_dense_when_context_exceeds_budget():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 16, generator=g)
    k, v = torch.randn(500, 2, 16, generator=g), torch.randn(500, 2, 16, generator=g)
    sparse, _ = sparse_decode_reference(q, [k], [v], 64)
    dense, _ = sparse_decode_reference(q, [k], [v], None)
    assert (sparse - dense).abs().max() > 1e-3


def test_teacher_forced_sparse_attention_matches_decode_at_every_position():
    from sparrow_megatron.sparsity.reference import position_budgets, sparse_causal_attention_reference
    from sparrow_megatron.sparsity.schedule import Schedule

    g = torch.Generator().manual_seed(7)
    seq_len, prompt_len, kv_heads, group, d = 230, 70, 2, 2, 16
    q = torch.randn(seq_len, kv_heads * group, d, generator=g)
    k, v = torch.randn(seq_len, kv_heads, d, generator=g), torch.randn(seq_len, kv_heads, d, generator=g)
    schedule = Schedule((64, 96), bin_width=128, dense_layers=())
    budgets = position_budgets(schedule, prompt_len, seq_len)
    assert budgets[prompt_len - 1] is None and budgets[prompt_len] == 64 and budgets[127] == 96
    out, mask = sparse_causal_attention_reference(q, k, v, budgets)
    assert not mask[:, 10, 11:].any()  # causal
    for t in range(seq_len):
        ref, (pages,) = sparse_decode_reference(q[t : t + 1], [k[: t + 1]], [v[: t + 1]], budgets[t])
        torch.testing.assert_close(out[t], ref[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(mask[:, t, : t + 1], pages_to_token_mask(pages, t + 1))


def test_teacher_forced_dense_budgets_equal_causal_attention():
    from sparrow_megatron.sparsity.reference import sparse_causal_attention_reference

    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(50, 4, 8, generator=g),
        torch.randn(50, 2, 8, generator=g),
        torch.randn(50, 2, 8, generator=g),
    )
    out, _ = sparse_causal_attention_reference(q, k, v, [None] * 50)
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1).repeat_interleave(2, 0),
        v.transpose(0, 1).repeat_interleave(2, 0),
        is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
