import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule, resolve_schedule


def test_presets_match_the_published_lists():
    assert PRESETS["qwen3-1.7b-0.86"].budgets == (512, 1024, 1536, 1536, 2048, 2560, 3072, 3584, 3584, 4096)
    assert len(PRESETS["qwen3-4b-0.86"].budgets) == 20
    assert PRESETS["qwen3-8b-0.86"].budgets[-3:] == (6144, 7168, 7168)
    assert PRESETS["qwen3-14b-0.86"].budgets[5:15] == (6144,) * 10
    for name, s in PRESETS.items():
        if not name.startswith("qwen3"):
            continue
        assert list(s.budgets) == sorted(s.budgets)
        assert s.provenance["tau"] == 0.86


def test_budget_at_uses_the_bin_of_the_produced_token_and_holds_the_last():
    s = PRESETS["qwen3-1.7b-0.86"]
    assert s.budget_at(1) == 512
    assert s.budget_at(1999) == 512
    assert s.budget_at(2000) == 1024
    assert s.budget_at(10**6) == 4096


@settings(max_examples=50, deadline=None)
@given(
    budgets=st.lists(
        st.one_of(st.none(), st.integers(3, 900).map(lambda p: p * 16)), min_size=1, max_size=25
    ),
    width=st.integers(1, 5000),
    suffix=st.sampled_from([".json", ".yaml"]),
)
def test_file_round_trip(tmp_path_factory, budgets, width, suffix):
    s = Schedule(tuple(budgets), bin_width=width, name="x", provenance={"model": "m", "tau": 0.9})
    path = s.save(tmp_path_factory.mktemp("s") / f"x{suffix}")
    back = Schedule.load(path)
    assert back == s and back.provenance == s.provenance


@pytest.mark.parametrize(
    "data, message",
    [
        ({"schema_version": 1, "budgets": [500]}, "budgets\\[0\\] = 500 is not a multiple of page_size 16"),
        ({"schema_version": 1, "budgets": [32]}, "below sink \\+ local"),
        ({"schema_version": 2, "budgets": [512]}, "field 'schema_version'"),
        ({"schema_version": 1}, "field 'budgets' is missing"),
        ({"schema_version": 1, "budgets": ["512"]}, "field 'budgets\\[0\\]' must be an integer"),
        ({"schema_version": 1, "budgets": [512], "bin_width": 0}, "bin_width must be positive"),
        ({"schema_version": 1, "budgets": [512], "colour": 1}, "unknown field"),
        ({"schema_version": 1, "budgets": []}, "budgets is empty"),
    ],
)
def test_invalid_schedules_name_the_problem(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        Schedule.load(path)


def test_unreadable_and_unparsable_files(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        Schedule.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"budgets": [512,\n}')
    with pytest.raises(UserError, match="bad.json:2: not valid JSON"):
        Schedule.load(bad)


def test_resolve_schedule():
    assert resolve_schedule("dense") is None
    assert resolve_schedule("qwen3-8b-0.86") is PRESETS["qwen3-8b-0.86"]
    with pytest.raises(UserError, match="unknown schedule 'nope'"):
        resolve_schedule("nope")
