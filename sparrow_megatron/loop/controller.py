"""The online KV-budget controller (beyond the paper; off by default).

Per position bin of the schedule: when the live p5 acceptance sits below tau - margin, raise that bin's
budget one step at once (a collapse is expensive, a step of budget is cheap); when it sits above
tau + margin for `patience` consecutive observations, lower it one step. A step is the next candidate
of the ladder (or `step_tokens`), always a multiple of the page size, within [min_budget, max_budget].
Bins without a populated observation keep their streaks. Dense bins (budget None) are left alone.
Every change is returned as a record with its reason and logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sparrow_megatron.errors import UserError
from sparrow_megatron.loop.config import ControllerConfig
from sparrow_megatron.sparsity.schedule import Schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetChange:
    step: int
    bin_index: int
    bin_start: int
    old_budget: int
    new_budget: int
    p5: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def schedule_metrics(schedule: Schedule | None) -> dict[str, float]:
    """The schedule in force as per-step metrics: `schedule/budget/bin_XXXXX` per explicit bin.

    Dense bins (and a dense rollout, schedule None) have no budget metric; `schedule/dense` says which.
    """
    from sparrow_megatron.loop.monitor import bin_key

    if schedule is None:
        return {"schedule/dense": 1.0}
    out = {"schedule/dense": 0.0}
    for i, budget in enumerate(schedule.budgets):
        if budget is not None:
            out[f"schedule/budget/{bin_key(i * schedule.bin_width)}"] = float(budget)
    return out


class BudgetController:
    def __init__(self, cfg: ControllerConfig, tau: float, schedule: Schedule):
        if schedule is None:
            raise UserError("the budget controller needs a sparse schedule (rollout.schedule is 'dense')")
        page = schedule.geometry.page_size
        for name, value in (
            ("min_budget", cfg.min_budget),
            ("max_budget", cfg.max_budget),
            ("step_tokens", cfg.step_tokens),
            *((f"ladder[{i}]", b) for i, b in enumerate(cfg.ladder)),
        ):
            if value <= 0 or value % page:
                raise UserError(
                    f"field 'monitor.controller.{name}': {value} is not a positive multiple of the "
                    f"schedule's page size {page}"
                )
        if cfg.min_budget < schedule.geometry.min_budget or cfg.min_budget > cfg.max_budget:
            raise UserError(
                f"field 'monitor.controller.min_budget': {cfg.min_budget} must be within "
                f"[{schedule.geometry.min_budget}, max_budget={cfg.max_budget}]"
            )
        self.cfg = cfg
        self.tau = tau
        self.schedule = schedule
        self.ladder = sorted({b for b in cfg.ladder if cfg.min_budget <= b <= cfg.max_budget})
        self._high: dict[int, int] = {}  # bin index -> consecutive observations above tau + margin
        self.changes: list[BudgetChange] = []

    # -- steps on the budget grid ---------------------------------------------------------------------

    def _up(self, budget: int) -> int:
        if self.ladder:
            above = [b for b in self.ladder if b > budget]
            target = above[0] if above else budget
        else:
            target = budget + self.cfg.step_tokens
        return max(min(target, self.cfg.max_budget), budget)

    def _down(self, budget: int) -> int:
        if self.ladder:
            below = [b for b in self.ladder if b < budget]
            target = below[-1] if below else budget
        else:
            target = budget - self.cfg.step_tokens
        return min(max(target, self.cfg.min_budget), budget)

    # -- the update -----------------------------------------------------------------------------------

    def update(
        self, step: int, p5_by_bin: Mapping[int, float], bin_width: int
    ) -> tuple[Schedule, list[BudgetChange]]:
        """Live p5 per populated bin (bin start -> p5) -> (schedule for the next rollout, changes)."""
        if bin_width != self.schedule.bin_width:
            raise ValueError(f"tails binned by {bin_width} tokens, schedule by {self.schedule.bin_width}")
        budgets = list(self.schedule.budgets)
        changes: list[BudgetChange] = []
        for start, p5 in sorted(p5_by_bin.items()):
            if start % bin_width:
                raise ValueError(f"bin start {start} is not a multiple of the bin width {bin_width}")
            index = start // bin_width
            # Past its last bin a schedule holds the last budget; spell it out before changing one bin.
            if index >= len(budgets):
                budgets += [budgets[-1]] * (index + 1 - len(budgets))
            old = budgets[index]
            if old is None:
                continue
            new, reason = old, ""
            if p5 < self.tau - self.cfg.margin:
                self._high[index] = 0
                new = self._up(old)
                reason = (
                    f"p5 {p5:.4f} < tau - margin = {self.tau - self.cfg.margin:.4f}: raise"
                    if new != old
                    else ""
                )
                if new == old:
                    log.warning(
                        "step %d: bin [%d, %d) p5 %.4f below tau - margin but its budget %d is at the "
                        "upper bound %d",
                        step,
                        start,
                        start + bin_width,
                        p5,
                        old,
                        self.cfg.max_budget,
                    )
            elif p5 > self.tau + self.cfg.margin:
                self._high[index] = self._high.get(index, 0) + 1
                if self._high[index] >= self.cfg.patience:
                    new = self._down(old)
                    if new != old:
                        reason = (
                            f"p5 > tau + margin = {self.tau + self.cfg.margin:.4f} for "
                            f"{self._high[index]} steps (now {p5:.4f}): lower"
                        )
                    self._high[index] = 0
            else:
                self._high[index] = 0
            if new != old:
                budgets[index] = new
                change = BudgetChange(step, index, start, old, new, float(p5), reason)
                changes.append(change)
                log.info(
                    "step %d: bin [%d, %d) budget %d -> %d (%s)",
                    step,
                    start,
                    start + bin_width,
                    old,
                    new,
                    reason,
                )
        if changes:
            provenance = dict(self.schedule.provenance)
            provenance["controller_step"] = step
            provenance.setdefault("controlled_from", self.schedule.name)
            name = self.schedule.name if self.schedule.name.endswith("-ctl") else f"{self.schedule.name}-ctl"
            self.schedule = dataclasses.replace(
                self.schedule, budgets=tuple(budgets), name=name, provenance=provenance
            )
            self.changes += changes
        return self.schedule, changes

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "high": {str(k): v for k, v in self._high.items()},
            "changes": [c.to_dict() for c in self.changes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule = Schedule.from_dict(state["schedule"], source="controller state")
        self._high = {int(k): int(v) for k, v in state["high"].items()}
        self.changes = [BudgetChange(**c) for c in state["changes"]]
