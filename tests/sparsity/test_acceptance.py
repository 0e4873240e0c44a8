import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_megatron.sparsity.acceptance import acceptance_from_topk, acceptance_rate


def _dist(seed, vocab, temp):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * temp, -1)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**6), vocab=st.integers(2, 60), temp=st.floats(0.1, 8.0))
def test_alpha_in_unit_interval_symmetric_and_one_iff_equal(seed, vocab, temp):
    p, q = _dist(seed, vocab, temp), _dist(seed + 1, vocab, temp)
    a = acceptance_rate(p, q)
    assert 0.0 <= a <= 1.0
    assert torch.isclose(a, acceptance_rate(q, p))
    assert torch.isclose(acceptance_rate(p, p), torch.tensor(1.0, dtype=p.dtype))
    if not torch.allclose(p.exp(), q.exp(), atol=1e-9):
        assert a < 1.0
    # alpha = 1 - TV
    assert torch.isclose(a, 1 - 0.5 * (p.exp() - q.exp()).abs().sum())


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    vocab=st.integers(2, 50),
    kp=st.integers(1, 50),
    kq=st.integers(1, 50),
    temp=st.floats(0.2, 6.0),
)
def test_topk_bounds_bracket_the_exact_value(seed, vocab, kp, kq, temp):
    p, q = _dist(seed, vocab, temp), _dist(seed + 7, vocab, temp)
    kp, kq = min(kp, vocab), min(kq, vocab)
    pl, pi = p.topk(kp)
    ql, qi = q.topk(kq)
    perm = torch.randperm(kq, generator=torch.Generator().manual_seed(seed))  # order must not matter
    est, lo, up = acceptance_from_topk(pi, pl, qi[perm], ql[perm])
    exact = acceptance_rate(p, q)
    assert lo - 1e-9 <= exact <= up + 1e-9
    assert lo - 1e-12 <= est <= up + 1e-12
    if kp == kq == vocab:
        assert torch.allclose(torch.stack([est, lo, up]), exact.expand(3), atol=1e-9)


def test_padding_and_minus_inf_count_as_absent_and_empty_rows_are_nan():
    ids = torch.tensor([[3, 1, -1], [-1, -1, -1]])
    lp = torch.tensor([[-0.1, float("-inf"), 0.0], [0.0, 0.0, 0.0]])
    est, lo, up = acceptance_from_topk(
        ids, lp, torch.tensor([[3, 1, 2], [3, 1, 2]]), torch.full((2, 3), -1.5)
    )
    assert torch.isclose(lo[0], torch.tensor(-1.5).exp())  # only id 3 overlaps with mass
    assert torch.isnan(est[1]) and torch.isnan(lo[1]) and torch.isnan(up[1])


def test_any_leading_shape():
    p = torch.log_softmax(torch.randn(2, 3, 10), -1)
    assert acceptance_rate(p, p).shape == (2, 3)
    ids = torch.arange(10).expand(2, 3, 10)
    est, lo, up = acceptance_from_topk(ids, p, ids, p)
    assert est.shape == (2, 3) and torch.allclose(lo, torch.ones(2, 3), atol=1e-6)
