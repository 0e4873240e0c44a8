"""The mismatch-tail monitor: per step, per position bin, the p5 of the sparse-vs-dense acceptance.

Each step's acceptance (estimate and bounds, from the rollout's and the trainer's top-K lists) goes
through `sparsity.tails.tail_report`; the monitor flattens it into MLflow metrics, keeps the history
for the heatmap, and warns when the p5 of a populated bin stays below tau for k consecutive
observations of that bin (steps where the bin is not populated neither extend nor break the streak,
and an alarmed bin stays alarmed until it is seen above tau again: long-position bins are populated
only by the longest responses, and would otherwise never alarm).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from sparrow_megatron.loop.config import MonitorConfig
from sparrow_megatron.sparsity.acceptance import acceptance_from_topk
from sparrow_megatron.sparsity.tails import BinStats, TailReport, tail_report

log = logging.getLogger(__name__)


def bin_key(start: int) -> str:
    """The metric suffix of the bin starting at `start` (zero-padded so names sort by position)."""
    return f"bin_{start:05d}"


@dataclass
class TailAlarm:
    """Bins whose p5 sat below tau for at least k consecutive observations, as of `step`."""

    step: int
    tau: float
    # (bin start, bin end, p5 this step, streak length)
    bins: list[tuple[int, int, float, int]]

    def describe(self) -> str:
        parts = [f"[{s}, {e}) p5={p5:.3f} for {n} steps" for s, e, p5, n in self.bins]
        return f"step {self.step}: p5 acceptance below tau={self.tau} in bins " + "; ".join(parts)


@dataclass
class StepTails:
    step: int
    bins: list[BinStats]
    tokens: int
    nan_tokens: int
    tau: float
    min_bin_tokens: int
    alarm: TailAlarm | None = None
    pearson_p5: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def populated(self) -> list[BinStats]:
        return [b for b in self.bins if b.count >= self.min_bin_tokens]

    def p5_by_bin(self) -> dict[int, float]:
        """Bin start -> p5 of the populated bins: what the controller acts on."""
        return {b.start: b.p5 for b in self.populated()}

    def min_p5(self) -> float | None:
        return min((b.p5 for b in self.populated()), default=None)

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: `tail/<stat>/bin_XXXXX` per bin plus run-level summaries."""
        out: dict[str, float] = {}
        for b in self.bins:
            key = bin_key(b.start)
            out[f"tail/count/{key}"] = float(b.count)
            out[f"tail/mean/{key}"] = b.mean
            out[f"tail/p5/{key}"] = b.p5
            if b.p5_lower is not None:
                out[f"tail/p5_lower/{key}"] = b.p5_lower
            if b.p5_upper is not None:
                out[f"tail/p5_upper/{key}"] = b.p5_upper
            if b.frac_below_tau is not None:
                out[f"tail/frac_below_tau/{key}"] = b.frac_below_tau
        populated = self.populated()
        out["tail/tokens"] = float(self.tokens)
        out["tail/nan_tokens"] = float(self.nan_tokens)
        out["tail/populated_bins"] = float(len(populated))
        if populated:
            out["tail/p5_min"] = min(b.p5 for b in populated)
            out["tail/bins_below_tau"] = float(sum(b.p5 < self.tau for b in populated))
        if self.bins:
            counts = np.array([b.count for b in self.bins], dtype=float)
            out["tail/mean"] = float(np.dot(counts, [b.mean for b in self.bins]) / counts.sum())
            fracs = [b.frac_below_tau for b in self.bins]
            if all(f is not None for f in fracs):
                out["tail/frac_below_tau"] = float(np.dot(counts, fracs) / counts.sum())
        if self.pearson_p5 is not None:
            out["tail/pearson_p5_position"] = self.pearson_p5
        out["tail/alarm"] = float(self.alarm is not None)
        out.update(self.extra)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepTails:
        data = dict(data)
        data["bins"] = [BinStats(**b) for b in data["bins"]]
        alarm = data.get("alarm")
        data["alarm"] = (
            None
            if alarm is None
            else TailAlarm(step=alarm["step"], tau=alarm["tau"], bins=[tuple(b) for b in alarm["bins"]])
        )
        return cls(**data)


class TailMonitor:
    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.history: list[StepTails] = []
        self._streaks: dict[int, int] = {}  # bin start -> consecutive populated observations below tau
        self._last: dict[int, tuple[int, float]] = {}  # bin start -> (bin end, last populated p5)
        self._alarmed: frozenset[int] = frozenset()

    def observe(
        self,
        step: int,
        alpha: np.ndarray | torch.Tensor,
        positions: np.ndarray | torch.Tensor,
        lower: np.ndarray | torch.Tensor | None = None,
        upper: np.ndarray | torch.Tensor | None = None,
    ) -> StepTails:
        """One step's per-token acceptance (estimate, bounds) at absolute positions -> its tails."""
        alpha, positions, lower, upper = (
            None if x is None else _numpy(x) for x in (alpha, positions, lower, upper)
        )
        alpha, positions = alpha.reshape(-1), positions.reshape(-1)
        lower = None if lower is None else lower.reshape(-1)
        upper = None if upper is None else upper.reshape(-1)
        for name, x in (("lower", lower), ("upper", upper)):
            if x is not None and x.shape != alpha.shape:
                raise ValueError(f"{name} {x.shape} and alpha {alpha.shape} differ")
        # The tail is taken of the chosen signal; the other two stay as the p5 bounds.
        signal = {"estimate": alpha, "lower": lower, "upper": upper}[self.cfg.signal]
        if signal is None:
            raise ValueError(
                f"monitor.signal={self.cfg.signal!r} but no {self.cfg.signal} acceptance was given"
            )
        nan_tokens = int(np.isnan(signal).sum())
        report: TailReport = tail_report(
            signal,
            positions,
            bin_width=self.cfg.bin_width,
            lower=lower,
            upper=upper,
            tau=self.cfg.tau,
            fit=self.cfg.beta_fit,
        )
        if nan_tokens:
            log.info(
                "step %d: %d tokens without acceptance information (NaN) left out of the tails",
                step,
                nan_tokens,
            )
        tails = StepTails(
            step=step,
            bins=report.bins,
            tokens=report.tokens,
            nan_tokens=nan_tokens,
            tau=self.cfg.tau,
            min_bin_tokens=self.cfg.min_bin_tokens,
            pearson_p5=report.pearson_p5,
        )
        if report.beta is not None:
            tails.extra.update(
                {"tail/beta_a": report.beta.a, "tail/beta_b": report.beta.b, "tail/beta_ks": report.beta.ks}
            )
        tails.alarm = self._update_streaks(tails)
        self.history.append(tails)
        return tails

    def observe_topk(
        self,
        step: int,
        dense_ids: torch.Tensor,
        dense_logprobs: torch.Tensor,
        rollout_ids: torch.Tensor,
        rollout_logprobs: torch.Tensor,
        positions: np.ndarray | torch.Tensor,
    ) -> StepTails:
        """From top-K lists per token ([T, K] each: trainer's dense p, rollout's sparse q)."""
        estimate, lower, upper = acceptance_from_topk(
            dense_ids, dense_logprobs, rollout_ids, rollout_logprobs
        )
        return self.observe(step, estimate, positions, lower, upper)

    def _update_streaks(self, tails: StepTails) -> TailAlarm | None:
        for b in tails.populated():
            self._streaks[b.start] = self._streaks.get(b.start, 0) + 1 if b.p5 < self.cfg.tau else 0
            self._last[b.start] = (b.end, b.p5)
        k = self.cfg.consecutive_steps
        failing = [(s, *self._last[s], n) for s, n in sorted(self._streaks.items()) if n >= k]
        starts = frozenset(s for s, *_ in failing)
        alarm = TailAlarm(step=tails.step, tau=self.cfg.tau, bins=failing) if failing else None
        # Warn when the set of failing bins changes, not on every step it persists.
        if alarm is not None and starts != self._alarmed:
            log.warning("%s (k=%d)", alarm.describe(), k)
        elif alarm is None and self._alarmed:
            log.info(
                "step %d: p5 acceptance back above tau=%s in every populated bin", tails.step, self.cfg.tau
            )
        self._alarmed = starts
        return alarm

    def heatmap(self, stat: str = "p5") -> tuple[list[int], list[int], np.ndarray]:
        """(steps, bin starts, matrix [steps, bins]) of one BinStats field; NaN where a bin is empty."""
        steps = [t.step for t in self.history]
        starts = sorted({b.start for t in self.history for b in t.bins})
        column = {s: j for j, s in enumerate(starts)}
        matrix = np.full((len(steps), len(starts)), np.nan)
        for i, t in enumerate(self.history):
            for b in t.bins:
                value = getattr(b, stat)
                matrix[i, column[b.start]] = math.nan if value is None else value
        return steps, starts, matrix

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue the same streaks and heatmap (JSON-able)."""
        return {
            "history": [t.to_dict() for t in self.history],
            "streaks": {str(k): v for k, v in self._streaks.items()},
            "last": {str(k): list(v) for k, v in self._last.items()},
            "alarmed": sorted(self._alarmed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [StepTails.from_dict(t) for t in state["history"]]
        self._streaks = {int(k): int(v) for k, v in state["streaks"].items()}
        self._last = {int(k): (int(v[0]), float(v[1])) for k, v in state["last"].items()}
        self._alarmed = frozenset(int(s) for s in state["alarmed"])


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)
