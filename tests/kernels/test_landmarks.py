import pytest
import torch
from sparrow_kernels.landmarks import landmark_buffer, update_landmarks

from sparrow_megatron.sparsity.selection import compute_landmarks
from tests.kernels.pool import DEVICE, build_pool, random_kv


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_then_decode_landmarks_match_rule(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    lengths = [37, 16, 50]
    grown = [n + 13 for n in lengths]  # decode 13 more tokens each: crosses page boundaries
    keys, values = random_kv(grown, 2, head_dim, generator=gen)
    pool = build_pool(keys, values, generator=gen)
    marks = landmark_buffer(pool.req_to_token.shape[0], 8, 2, head_dim, torch.bfloat16, DEVICE)
    marks.fill_(float("nan"))
    args = (pool.k_buffer, pool.req_to_token, pool.req_pool_indices)

    update_landmarks(*args, [0, 0, 0], lengths, marks)
    for b, n in enumerate(lengths):
        want = compute_landmarks(keys[b][:n])
        got = marks[pool.req_pool_indices[b], : n // 16].cpu()
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
        assert (got == want).float().mean() > 0.95  # same fp32 mean, same bf16 rounding but for rare ulps
        assert torch.isnan(marks[pool.req_pool_indices[b], n // 16 :]).all()  # nothing past the full pages

    for step in range(1, 14):
        update_landmarks(*args, [n + step - 1 for n in lengths], [n + step for n in lengths], marks)
    for b, n in enumerate(grown):
        want = compute_landmarks(keys[b])
        torch.testing.assert_close(
            marks[pool.req_pool_indices[b], : n // 16].cpu(), want, atol=1e-2, rtol=1e-2
        )
        assert torch.isnan(marks[pool.req_pool_indices[b], n // 16 :]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_landmarks_by_physical_page_match_rule_and_skip_minus_one(dtype):
    """The SGLang layout: landmarks[p] is the mean of slots [16p, 16p + 16); -1 writes nothing."""
    from sparrow_kernels.landmarks import update_page_landmarks

    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(10 * 16, 2, 64, generator=gen).to(dtype).to(DEVICE)
    marks = torch.full((10, 2, 64), 7.0, dtype=dtype, device=DEVICE)
    pages = torch.tensor([4, -1, 1, 9], device=DEVICE)
    update_page_landmarks(keys, marks, pages, 16)
    for p in range(10):
        expected = (
            compute_landmarks(keys[16 * p : 16 * p + 16], 16)[0] if p in (1, 4, 9) else marks[p] * 0 + 7
        )
        torch.testing.assert_close(marks[p], expected, rtol=0, atol=0)
