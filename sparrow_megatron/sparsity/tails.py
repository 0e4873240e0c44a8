"""Lower-tail statistics of the acceptance rate by absolute position (the paper's stability signal).

The mean acceptance hardly moves under aggressive sparsity; the 5th percentile per position bin does,
and it is what the threshold tau is checked against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

DEFAULT_BIN_WIDTH = 2000
NEAR_ONE = 0.999  # tokens above this are "accepted"; the rest follow a scaled Beta


@dataclass
class BinStats:
    start: int
    end: int
    count: int
    mean: float
    p1: float
    p5: float
    p10: float
    p5_lower: float | None = None
    p5_upper: float | None = None
    frac_below_tau: float | None = None

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2


@dataclass
class BetaFit:
    a: float
    b: float
    ks: float
    count: int


@dataclass
class TailReport:
    bin_width: int
    bins: list[BinStats] = field(default_factory=list)
    pearson_p5: float | None = None
    pearson_mean: float | None = None
    beta: BetaFit | None = None
    tokens: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        return out

    def min_p5(self) -> float | None:
        return min((b.p5 for b in self.bins), default=None)


def token_positions(prompt_lens: Iterable[int], response_lens: Iterable[int]) -> np.ndarray:
    """Absolute positions (prompt_len + index) of every generated token, sequences concatenated."""
    return np.concatenate(
        [p + np.arange(n) for p, n in zip(prompt_lens, response_lens, strict=True)] or [np.zeros(0, int)]
    )


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or np.ptp(x) < 1e-12 or np.ptp(y) < 1e-12:
        return None
    return float(stats.pearsonr(x, y).statistic)


def fit_beta(alpha: np.ndarray) -> BetaFit | None:
    """Beta fit of the tokens with alpha < 0.999, rescaled to [0, 1], with its KS statistic."""
    low = alpha[alpha < NEAR_ONE] / NEAR_ONE
    low = np.clip(low, 1e-6, 1 - 1e-6)
    if low.size < 10 or np.ptp(low) == 0:
        return None
    a, b, _, _ = stats.beta.fit(low, floc=0.0, fscale=1.0)
    ks = stats.kstest(low, "beta", args=(a, b)).statistic
    return BetaFit(a=float(a), b=float(b), ks=float(ks), count=int(low.size))


def tail_report(
    alpha: np.ndarray,
    positions: np.ndarray,
    bin_width: int = DEFAULT_BIN_WIDTH,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    tau: float | None = None,
    fit: bool = True,
) -> TailReport:
    """Per-bin count, mean, p1/p5/p10 (and p5 of the bounds, fraction below tau) of alpha.

    NaN alphas (tokens without information) are dropped; the caller counts them if it cares.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    positions = np.asarray(positions)
    if alpha.shape != positions.shape:
        raise ValueError(f"alpha {alpha.shape} and positions {positions.shape} differ")
    keep = ~np.isnan(alpha)
    alpha, positions = alpha[keep], positions[keep]
    lower = None if lower is None else np.asarray(lower, dtype=np.float64)[keep]
    upper = None if upper is None else np.asarray(upper, dtype=np.float64)[keep]
    report = TailReport(bin_width=bin_width, tokens=int(alpha.size))
    bins = positions // bin_width
    for b in np.unique(bins):
        sel = bins == b
        a = alpha[sel]
        p1, p5, p10 = np.percentile(a, [1, 5, 10])
        report.bins.append(
            BinStats(
                start=int(b * bin_width),
                end=int((b + 1) * bin_width),
                count=int(a.size),
                mean=float(a.mean()),
                p1=float(p1),
                p5=float(p5),
                p10=float(p10),
                p5_lower=None if lower is None else float(np.nanpercentile(lower[sel], 5)),
                p5_upper=None if upper is None else float(np.nanpercentile(upper[sel], 5)),
                frac_below_tau=None if tau is None else float((a < tau).mean()),
            )
        )
    centres = [b.centre for b in report.bins]
    report.pearson_p5 = _pearson([b.p5 for b in report.bins], centres)
    report.pearson_mean = _pearson([b.mean for b in report.bins], centres)
    if fit:
        report.beta = fit_beta(alpha)
    return report
