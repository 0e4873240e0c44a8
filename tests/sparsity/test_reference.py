import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_megatron.sparsity.reference import sparse_decode_reference
from sparrow_megatron.sparsity.selection import compute_landmarks, group_mean_query, select_pages


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
        ref = _dense_sdpa(q[0, h * group : (h + 1) * group].float(), k[tokens][:, h : h + 1].float(),
                          v[tokens][:, h : h + 1].float())
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
