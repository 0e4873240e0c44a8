import numpy as np
import pytest
from scipy import stats

from sparrow_megatron.sparsity.tails import tail_report, token_positions


def test_bins_by_absolute_position_with_exact_percentiles():
    positions = token_positions([100, 1900], [50, 300])
    assert positions[0] == 100 and positions[50] == 1900 and positions.size == 350
    alpha = np.linspace(0.5, 1.0, positions.size)
    report = tail_report(alpha, positions, bin_width=2000, tau=0.9, fit=False)
    assert [(b.start, b.end) for b in report.bins] == [(0, 2000), (2000, 4000)]
    first = alpha[positions < 2000]
    assert report.bins[0].count == first.size
    assert report.bins[0].p5 == pytest.approx(np.percentile(first, 5))
    assert report.bins[0].mean == pytest.approx(first.mean())
    assert report.bins[0].frac_below_tau == pytest.approx((first < 0.9).mean())


def test_pearson_sees_the_decaying_tail_the_mean_hides():
    rng = np.random.default_rng(0)
    positions = np.repeat(np.arange(10) * 1000 + 500, 2000)
    bins = positions // 1000
    # 90% of tokens near 1; a low tail whose depth grows with position, mean almost flat
    alpha = np.where(
        rng.random(positions.size) < 0.90, 0.9995, 1 - rng.beta(2, 5, positions.size) * (0.2 + bins / 12)
    )
    report = tail_report(alpha, positions, bin_width=1000, fit=False)
    assert report.pearson_p5 < -0.9
    p5_drop = report.bins[0].p5 - report.bins[-1].p5
    mean_drop = report.bins[0].mean - report.bins[-1].mean
    assert p5_drop > 5 * mean_drop > 0


def test_beta_fit_recovers_parameters_and_reports_ks():
    rng = np.random.default_rng(1)
    low = rng.beta(5.0, 1.5, 20000) * 0.999
    alpha = np.concatenate([low, np.full(50000, 0.9999)])
    report = tail_report(alpha, np.arange(alpha.size), bin_width=10**6)
    assert report.beta.count == 20000
    assert report.beta.a == pytest.approx(5.0, rel=0.1) and report.beta.b == pytest.approx(1.5, rel=0.1)
    assert report.beta.ks < 0.02
    assert report.beta.ks == pytest.approx(
        stats.kstest(low / 0.999, "beta", args=(report.beta.a, report.beta.b)).statistic
    )


def test_nan_tokens_are_dropped_and_bounds_get_their_own_p5():
    alpha = np.array([0.9, np.nan, 0.8, 0.7])
    report = tail_report(alpha, np.arange(4), lower=alpha - 0.1, upper=alpha + 0.05, fit=False)
    assert report.tokens == 3
    assert report.bins[0].p5_lower < report.bins[0].p5 < report.bins[0].p5_upper
