import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.solver import TailTable, solve_schedule

CANDIDATES = (64, 128, 256, 512)


def _brute_force(table, tau):
    """Cheapest (smallest total budget) non-decreasing feasible assignment, by enumeration."""
    best = None
    for combo in itertools.product(range(len(table.budgets)), repeat=table.num_bins):
        budgets = [table.budgets[i] for i in combo]
        if budgets != sorted(budgets):
            continue
        feasible = all(table.p5[i][j] is not None and table.p5[i][j] >= tau for j, i in enumerate(combo))
        if feasible and (best is None or sum(budgets) < sum(best)):
            best = budgets
    return best


@settings(max_examples=150, deadline=None)
@given(
    p5=st.lists(
        st.lists(st.one_of(st.none(), st.floats(0.5, 1.0)), min_size=4, max_size=4), min_size=4, max_size=4
    ),
    tau=st.floats(0.6, 0.95),
)
def test_solver_equals_brute_force(p5, tau):
    table = TailTable(CANDIDATES, tuple(tuple(r) for r in p5), bin_width=100)
    expected = _brute_force(table, tau)
    if expected is None:
        with pytest.raises(UserError, match=r"bin \d+ \(positions"):
            solve_schedule(table, tau)
    else:
        assert list(solve_schedule(table, tau).budgets) == expected


def test_dense_fallback_makes_the_failing_bin_and_later_bins_dense():
    table = TailTable((64, 128), ((0.9, 0.5, 0.95), (0.95, 0.7, 0.99)), bin_width=100)
    with pytest.raises(UserError, match=r"bin 1 \(positions 100-200\).*best p5 0.700"):
        solve_schedule(table, 0.86)
    assert solve_schedule(table, 0.86, dense_fallback=True).budgets == (64, None, None)


def test_a_failing_unmeasured_bin_names_the_measured_bin_it_stands_for():
    from sparrow_megatron.sparsity.calibrate import fill_unmeasured

    # Rollouts start at position 250: bins 0-1 are unmeasured and take bin 2's p5.
    table, filled = fill_unmeasured(
        TailTable((64, 128), ((None, None, 0.5), (None, None, 0.7)), bin_width=100)
    )
    assert filled == [(64, 0, 2), (64, 1, 2), (128, 0, 2), (128, 1, 2)]
    with pytest.raises(
        UserError, match=r"bin 0 \(positions 0-100\).*not measured.*bin 2 \(positions 200-300\)"
    ):
        solve_schedule(table, 0.86)


def test_table_file_round_trip_and_errors(tmp_path):
    table = TailTable((128, 64), ((0.9, None), (0.8, 0.7)), bin_width=100)
    path = table.save(tmp_path / "t.json")
    back = TailTable.load(path)
    assert back.budgets == (64, 128) and back.p5 == ((0.8, 0.7), (0.9, None))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"schema_version": 1, "rows": [{"budget": 64, "p5": [1]}, {"budget": 128, "p5": []}]})
    )
    with pytest.raises(UserError, match=r"rows\[1\].p5' has 0 bins"):
        TailTable.load(bad)
    bad.write_text(json.dumps({"schema_version": 1, "rows": [{"budget": 100, "p5": [1]}]}))
    with pytest.raises(UserError, match="candidate budget 100"):
        TailTable.load(bad)
