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
