import json
import logging

import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.loop.config import ControllerConfig
from sparrow_megatron.loop.controller import BudgetController, schedule_metrics
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule

TAU = 0.86


def _schedule():
    return Schedule((512, 1024, 1536, 2048), name="base")


def test_low_tail_raises_exactly_the_failing_bins(caplog):
    caplog.set_level(logging.INFO, logger="sparrow_megatron.loop.controller")
    ctl = BudgetController(ControllerConfig(enabled=True, margin=0.02), TAU, _schedule())
    p5 = {0: 0.95, 2000: 0.70, 4000: 0.90, 6000: 0.83}
    schedule, changes = ctl.update(1, p5, 2000)
    assert schedule.budgets == (512, 1024 + 256, 1536, 2048 + 256)
    assert [(c.bin_start, c.old_budget, c.new_budget) for c in changes] == [
        (2000, 1024, 1280),
        (6000, 2048, 2304),
    ]
    assert all("raise" in c.reason and c.step == 1 for c in changes)
    assert schedule.name == "base-ctl" and schedule.provenance["controller_step"] == 1
    assert "budget 1024 -> 1280" in caplog.text
    # Within the margin: no change.
    schedule, changes = ctl.update(2, {2000: TAU - 0.01, 6000: TAU + 0.01}, 2000)
    assert changes == [] and schedule.budgets == (512, 1280, 1536, 2304)
    # Fed the low tail again, it keeps raising the same bins, one step per update.
    for step in range(3, 6):
        schedule, _ = ctl.update(step, {2000: 0.5}, 2000)
    assert schedule.budgets == (512, 1280 + 3 * 256, 1536, 2304)


def test_high_tail_lowers_only_after_patience():
    ctl = BudgetController(ControllerConfig(enabled=True, margin=0.02, patience=3), TAU, _schedule())
    for step in range(2):
        schedule, changes = ctl.update(step, {4000: 0.99}, 2000)
        assert changes == []
    schedule, changes = ctl.update(2, {4000: 0.99}, 2000)
    assert schedule.budgets == (512, 1024, 1536 - 256, 2048)
    assert len(changes) == 1 and "lower" in changes[0].reason and "3 steps" in changes[0].reason
    # The count restarts after a change, and a step inside the margin resets it.
    ctl.update(3, {4000: 0.99}, 2000)
    ctl.update(4, {4000: 0.99}, 2000)
    ctl.update(5, {4000: 0.87}, 2000)
    schedule, changes = ctl.update(6, {4000: 0.99}, 2000)
    assert changes == [] and schedule.budgets[2] == 1280
    # Missing observations keep the count.
    ctl.update(7, {}, 2000)
    ctl.update(8, {4000: 0.99}, 2000)
    schedule, changes = ctl.update(9, {4000: 0.99}, 2000)
    assert schedule.budgets[2] == 1024 and len(changes) == 1


def test_bounds_are_respected(caplog):
    cfg = ControllerConfig(enabled=True, margin=0.0, patience=1, min_budget=512, max_budget=1536)
    ctl = BudgetController(cfg, TAU, _schedule())
    for step in range(10):
        schedule, _ = ctl.update(step, {0: 0.99, 2000: 0.1}, 2000)
    assert schedule.budgets[0] == 512  # at min already: never lowered below it
    assert schedule.budgets[1] == 1536  # raised up to max and no further
    assert "upper bound 1536" in caplog.text
    for b in schedule.budgets:
        assert b % schedule.geometry.page_size == 0


def test_ladder_steps_and_page_multiples():
    cfg = ControllerConfig(enabled=True, patience=1, ladder=[512, 768, 1024, 2048, 4096], max_budget=4096)
    ctl = BudgetController(cfg, TAU, _schedule())
    schedule, _ = ctl.update(0, {0: 0.5, 2000: 0.5, 4000: 0.99}, 2000)
    assert schedule.budgets[:3] == (768, 2048, 1024)  # 1536 is off the ladder: nearest rungs
    schedule, _ = ctl.update(1, {2000: 0.5}, 2000)
    assert schedule.budgets[1] == 4096
    schedule, _ = ctl.update(2, {2000: 0.5}, 2000)
    assert schedule.budgets[1] == 4096
    with pytest.raises(UserError, match="ladder\\[1\\]"):
        BudgetController(ControllerConfig(ladder=[512, 700]), TAU, _schedule())
    with pytest.raises(UserError, match="step_tokens"):
        BudgetController(ControllerConfig(step_tokens=100), TAU, _schedule())
    with pytest.raises(UserError, match="dense"):
        BudgetController(ControllerConfig(), TAU, None)


def test_bins_past_the_schedule_end_and_dense_bins():
    ctl = BudgetController(ControllerConfig(enabled=True), TAU, Schedule((512, None, 1024)))
    schedule, changes = ctl.update(0, {2000: 0.1, 10000: 0.1}, 2000)
    # The dense bin stays dense; bin 5 is spelled out from the held last budget before it is raised.
    assert schedule.budgets == (512, None, 1024, 1024, 1024, 1280)
    assert [c.bin_index for c in changes] == [5]
    assert schedule.budget_at(9999) == 1024 and schedule.budget_at(10000) == 1280
    with pytest.raises(ValueError, match="binned by 1000"):
        ctl.update(1, {0: 0.5}, 1000)


def test_state_round_trip_and_preset():
    cfg = ControllerConfig(enabled=True, patience=2)
    ctl = BudgetController(cfg, TAU, PRESETS["qwen3-1.7b-0.86"])
    ctl.update(0, {0: 0.99, 2000: 0.5}, 2000)
    state = json.loads(json.dumps(ctl.state_dict()))
    resumed = BudgetController(cfg, TAU, PRESETS["qwen3-1.7b-0.86"])
    resumed.load_state_dict(state)
    assert resumed.schedule == ctl.schedule and resumed.changes == ctl.changes
    schedule, changes = resumed.update(1, {0: 0.99}, 2000)
    assert [(c.bin_index, c.new_budget) for c in changes] == [(0, 256)]
    assert schedule.budgets[1] == 1024 + 256
    assert PRESETS["qwen3-1.7b-0.86"].budgets[1] == 1024  # presets are never mutated


def test_schedule_metrics():
    assert schedule_metrics(None) == {"schedule/dense": 1.0}
    assert schedule_metrics(Schedule((512, None, 1024))) == {
        "schedule/dense": 0.0,
        "schedule/budget/bin_00000": 512.0,
        "schedule/budget/bin_04000": 1024.0,
    }
