import pytest
import torch
from sparrow_kernels.decode_attention import paged_decode_attention
from sparrow_kernels.landmarks import landmark_buffer, update_landmarks
from sparrow_kernels.sparse_decode import sparse_paged_decode

from sparrow_megatron.sparsity.reference import sparse_decode_reference
from tests.kernels.pool import DEVICE, build_pool, random_kv

BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def _setup(lengths, num_kv_heads, group, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    keys, values = random_kv(lengths, num_kv_heads, head_dim, generator=gen)
    pool = build_pool(keys, values, generator=gen)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, generator=gen).to(torch.bfloat16)
    marks = landmark_buffer(
        pool.req_to_token.shape[0], max(lengths) // 16 + 1, num_kv_heads, head_dim, torch.bfloat16, DEVICE
    )
    update_landmarks(
        pool.k_buffer, pool.req_to_token, pool.req_pool_indices, [0] * len(lengths), lengths, marks
    )
    return keys, values, pool, q, marks


@pytest.mark.parametrize(
    ("num_kv_heads", "group", "head_dim"), [(2, 2, 64), (1, 4, 128), (2, 5, 64), (1, 8, 128)]
)
def test_sparse_decode_matches_reference(num_kv_heads, group, head_dim):
    """Mixed batch: sparse requests, one with budget >= length (dense), lengths not multiples of 16."""
    lengths, budgets = [150, 33, 97], [64, 64, 80]
    keys, values, pool, q, marks = _setup(lengths, num_kv_heads, group, head_dim, seed=group * head_dim)
    out, table, count = sparse_paged_decode(
        q.to(DEVICE), pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices, pool.seq_lens,
        lengths, budgets, marks, pages_per_split=2,
    )  # fmt: skip
    want, want_pages = sparse_decode_reference(q, keys, values, budgets)
    for b in range(len(lengths)):
        assert torch.equal(table[b, :, : int(count[b])].cpu().long(), want_pages[b]), f"request {b}"
    torch.testing.assert_close(out.cpu().float(), want.float(), **BF16_TOL)
    dense, _ = sparse_decode_reference(q, keys, values, None)  # the sparse requests really are sparse
    assert (dense[0].float() - want[0].float()).abs().max() > 0.1


@pytest.mark.parametrize("pages_per_split", [None, 1, 3])
def test_dense_kernel_matches_reference(pages_per_split):
    """page_table=None: every page, split or not; the short request leaves later splits empty."""
    lengths = [61, 7, 130]
    keys, values, pool, q, _ = _setup(lengths, 2, 4, 64, seed=11)
    out = paged_decode_attention(
        q.to(DEVICE), pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices, pool.seq_lens,
        pages_per_split=pages_per_split, pages_per_block=1,
    )  # fmt: skip
    want, _ = sparse_decode_reference(q, keys, values, None)
    torch.testing.assert_close(out.cpu().float(), want.float(), **BF16_TOL)


def test_budget_at_least_length_is_dense():
    lengths = [40, 64]
    keys, values, pool, q, marks = _setup(lengths, 1, 2, 64, seed=5)
    out, table, count = sparse_paged_decode(
        q.to(DEVICE), pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices, pool.seq_lens,
        lengths, 64, marks,
    )  # fmt: skip
    assert table is None and count is None
    want, _ = sparse_decode_reference(q, keys, values, 64)
    torch.testing.assert_close(out.cpu().float(), want.float(), **BF16_TOL)


def test_explicit_page_list_attends_only_those_pages():
    """Any page list (not only the rule's): the kernel attends exactly those pages' tokens."""
    lengths = [120]
    keys, values, pool, q, _ = _setup(lengths, 2, 2, 64, seed=9)
    pages = torch.tensor([[[1, 4, 7], [0, 2, 7]]], dtype=torch.int32)
    out = paged_decode_attention(
        q.to(DEVICE), pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices, pool.seq_lens,
        pages.to(DEVICE), torch.tensor([3], dtype=torch.int32, device=DEVICE), pages_per_split=2,
    )  # fmt: skip
    for h in range(2):
        tokens = torch.cat([torch.arange(p * 16, min(p * 16 + 16, 120)) for p in pages[0, h].tolist()])
        qh = q[0, 2 * h : 2 * h + 2].float()
        probs = torch.softmax(qh @ keys[0][tokens, h].float().T / 8.0, dim=-1)
        want = probs @ values[0][tokens, h].float()
        torch.testing.assert_close(out[0, 2 * h : 2 * h + 2].cpu().float(), want, **BF16_TOL)
