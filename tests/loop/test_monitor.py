import json
import logging

import numpy as np
import pytest
import torch

from sparrow_megatron.loop.config import MonitorConfig
from sparrow_megatron.loop.monitor import TailMonitor
from sparrow_megatron.sparsity.acceptance import acceptance_rate


def _step_data(rng, low_bins=(), n_per_bin=400, bins=3, width=2000, low_value=0.5):
    """Per-token alpha for `bins` bins: ~1 everywhere, 20% of tokens at low_value in the low bins."""
    positions = np.concatenate([b * width + rng.integers(0, width, n_per_bin) for b in range(bins)])
    alpha = np.full(positions.shape, 0.9995)
    for b in low_bins:
        idx = np.flatnonzero(positions // width == b)
        alpha[idx[: n_per_bin // 5]] = low_value
    return alpha, positions


def test_metrics_per_bin_match_numpy():
    rng = np.random.default_rng(0)
    positions = rng.integers(0, 6000, 3000)
    alpha = rng.uniform(0.5, 1.0, 3000)
    lower, upper = alpha - 0.05, np.minimum(alpha + 0.05, 1.0)
    monitor = TailMonitor(MonitorConfig(tau=0.86))
    m = monitor.observe(1, alpha, positions, lower, upper).metrics()
    for b in range(3):
        sel = positions // 2000 == b
        key = f"bin_{b * 2000:05d}"
        assert m[f"tail/count/{key}"] == sel.sum()
        assert m[f"tail/mean/{key}"] == pytest.approx(alpha[sel].mean())
        assert m[f"tail/p5/{key}"] == pytest.approx(np.percentile(alpha[sel], 5))
        assert m[f"tail/p5_lower/{key}"] == pytest.approx(np.percentile(lower[sel], 5))
        assert m[f"tail/p5_upper/{key}"] == pytest.approx(np.percentile(upper[sel], 5))
        assert m[f"tail/frac_below_tau/{key}"] == pytest.approx((alpha[sel] < 0.86).mean())
    assert "tail/p5/bin_02000" in m
    assert m["tail/tokens"] == 3000
    assert m["tail/p5_min"] == pytest.approx(
        min(np.percentile(alpha[positions // 2000 == b], 5) for b in range(3))
    )
    assert m["tail/frac_below_tau"] == pytest.approx((alpha < 0.86).mean())
    assert m["tail/mean"] == pytest.approx(alpha.mean())
    assert m["tail/alarm"] == 0.0
    json.dumps(m)  # plain floats, loggable anywhere


def test_signal_lower_takes_the_tail_of_the_lower_bound():
    rng = np.random.default_rng(1)
    positions = rng.integers(0, 2000, 500)
    alpha = rng.uniform(0.8, 1.0, 500)
    lower = alpha - 0.1
    tails = TailMonitor(MonitorConfig(signal="lower")).observe(0, alpha, positions, lower, alpha)
    assert tails.bins[0].p5 == pytest.approx(np.percentile(lower, 5))
    with pytest.raises(ValueError, match="no lower acceptance"):
        TailMonitor(MonitorConfig(signal="lower")).observe(0, alpha, positions)


def test_warning_after_k_consecutive_low_steps_names_the_bins(caplog, monkeypatch):
    # A library imported by an earlier test may have run logging.config with disable_existing_loggers.
    monkeypatch.setattr(logging.getLogger("sparrow_megatron.loop.monitor"), "disabled", False)
    rng = np.random.default_rng(2)
    monitor = TailMonitor(MonitorConfig(tau=0.86, consecutive_steps=3))
    caplog.set_level(logging.INFO, logger="sparrow_megatron.loop.monitor")
    for step in range(2):
        tails = monitor.observe(step, *_step_data(rng, low_bins=(1,)))
        assert tails.alarm is None
        assert tails.metrics()["tail/bins_below_tau"] == 1
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    tails = monitor.observe(2, *_step_data(rng, low_bins=(1,)))
    assert tails.alarm is not None
    assert [b[:2] for b in tails.alarm.bins] == [(2000, 4000)]
    assert tails.alarm.bins[0][3] == 3
    assert tails.metrics()["tail/alarm"] == 1.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "[2000, 4000)" in warnings[0] and "[0, 2000)" not in warnings[0]
    # Persisting: still alarmed, no second warning for the same bins.
    assert monitor.observe(3, *_step_data(rng, low_bins=(1,))).alarm is not None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    # Bin 1 recovers: the alarm clears.
    assert monitor.observe(4, *_step_data(rng)).alarm is None


def test_a_high_step_breaks_the_streak():
    rng = np.random.default_rng(3)
    monitor = TailMonitor(MonitorConfig(consecutive_steps=2))
    monitor.observe(0, *_step_data(rng, low_bins=(0,)))
    monitor.observe(1, *_step_data(rng))
    assert monitor.observe(2, *_step_data(rng, low_bins=(0,))).alarm is None
    assert monitor.observe(3, *_step_data(rng, low_bins=(0,))).alarm is not None


def test_unpopulated_bins_neither_count_nor_break_the_streak():
    rng = np.random.default_rng(4)
    monitor = TailMonitor(MonitorConfig(consecutive_steps=2, min_bin_tokens=50))
    monitor.observe(0, *_step_data(rng, low_bins=(2,), bins=3))
    # Bin 2 gets only 10 tokens, all low: not populated, so ignored.
    alpha, pos = _step_data(rng, bins=2)
    alpha = np.concatenate([alpha, np.full(10, 0.1)])
    pos = np.concatenate([pos, np.full(10, 4500)])
    tails = monitor.observe(1, alpha, pos)
    assert tails.alarm is None
    assert 4000 not in tails.p5_by_bin() and tails.bins[-1].count == 10
    assert tails.metrics()["tail/p5_min"] > 0.86  # the unpopulated bin does not set the min
    tails = monitor.observe(2, *_step_data(rng, low_bins=(2,), bins=3))
    assert tails.alarm is not None and [b[0] for b in tails.alarm.bins] == [4000]


def test_nan_tokens_are_counted_and_left_out():
    alpha = np.array([0.9, np.nan, 0.95, np.nan])
    tails = TailMonitor(MonitorConfig(min_bin_tokens=1)).observe(0, alpha, np.array([1, 2, 3, 4]))
    assert tails.tokens == 2 and tails.nan_tokens == 2
    assert tails.bins[0].count == 2


def test_observe_topk_with_full_lists_is_exact():
    torch.manual_seed(0)
    vocab, tokens = 20, 300
    p = torch.randn(tokens, vocab).log_softmax(-1)
    q = (p + 0.3 * torch.randn(tokens, vocab)).log_softmax(-1)
    p_lp, p_ids = p.topk(vocab, dim=-1)
    q_lp, q_ids = q.topk(vocab, dim=-1)
    positions = torch.arange(tokens) * 10
    tails = TailMonitor(MonitorConfig(min_bin_tokens=1)).observe_topk(0, p_ids, p_lp, q_ids, q_lp, positions)
    exact = acceptance_rate(p, q).double().numpy()
    bins = positions.numpy() // 2000
    for b in tails.bins:
        sel = bins == b.start // 2000
        assert b.p5 == pytest.approx(np.percentile(exact[sel], 5), abs=1e-5)
        assert b.p5_lower == pytest.approx(b.p5, abs=1e-5) and b.p5_upper == pytest.approx(b.p5, abs=1e-5)


def test_heatmap_and_state_round_trip():
    rng = np.random.default_rng(5)
    cfg = MonitorConfig(consecutive_steps=3)
    monitor = TailMonitor(cfg)
    monitor.observe(0, *_step_data(rng, low_bins=(1,), bins=2))
    monitor.observe(1, *_step_data(rng, low_bins=(1,), bins=3))
    steps, starts, matrix = monitor.heatmap()
    assert steps == [0, 1] and starts == [0, 2000, 4000]
    assert np.isnan(matrix[0, 2]) and not np.isnan(matrix[1, 2])
    assert matrix[0, 1] < 0.86 < matrix[0, 0]
    # A resumed monitor continues the streak: the third low step alarms.
    state = json.loads(json.dumps(monitor.state_dict()))
    resumed = TailMonitor(cfg)
    resumed.load_state_dict(state)
    assert resumed.heatmap()[0] == [0, 1]
    np.testing.assert_array_equal(resumed.heatmap()[2], matrix)
    assert resumed.observe(2, *_step_data(rng, low_bins=(1,), bins=2)).alarm is not None


def test_empty_step_and_shape_errors():
    monitor = TailMonitor(MonitorConfig())
    tails = monitor.observe(0, np.zeros(0), np.zeros(0, dtype=int))
    m = tails.metrics()
    assert (
        tails.bins == []
        and m["tail/tokens"] == 0
        and m["tail/populated_bins"] == 0
        and "tail/p5_min" not in m
    )
    assert monitor.heatmap()[2].shape == (1, 0)
    with pytest.raises(ValueError, match="differ"):
        monitor.observe(1, np.ones(3), np.arange(3), lower=np.ones(2))
    with pytest.raises(ValueError, match="differ"):
        monitor.observe(1, np.ones(3), np.arange(4))
