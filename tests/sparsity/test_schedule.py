import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule, resolve_schedule

# Transcribed from the paper's reference code (vortex_torch/indexer/utils_sglang.py): top-k pages per
# 2000-token bin, not counting the 1 sink and 2 local pages of 16 tokens.
# fmt: off
REFERENCE_TOPK_PAGES = {
    "qwen3-1.7b-0.86": [29, 61, 93, 93, 125, 157, 189, 221, 221, 253, 253, 253, 253, 253, 253, 253, 253, 253, 253, 253],
    "qwen3-4b-0.86": [29, 45, 61, 77, 93, 125, 157, 221, 253, 253, 317, 317, 317, 317, 381, 381, 381, 381, 509, 509],
    "qwen3-8b-0.86": [29, 45, 61, 77, 125, 157, 189, 253, 253, 253, 253, 317, 317, 317, 317, 317, 317, 385, 445, 445],
    "qwen3-14b-0.86": [29, 45, 77, 125, 253, 381, 381, 381, 381, 381, 381, 381, 381, 381, 381, 509, 637, 637, 893, 893],
}
# fmt: on


@pytest.mark.parametrize("name", sorted(REFERENCE_TOPK_PAGES))
def test_presets_equal_the_reference_lists_bin_for_bin(name):
    s = PRESETS[name]
    pages = REFERENCE_TOPK_PAGES[name]
    g = s.geometry
    assert (s.bin_width, g.page_size, g.sink_pages, g.local_pages) == (2000, 16, 1, 2)
    assert s.budgets == tuple((k + 3) * 16 for k in pages)
    assert s.dense_layers == (0, 1)  # the reference's vortex_layers_skip=[0,1]
    assert s.provenance["tau"] == 0.86
    # Each decode position gets its bin's budget; past the 20th bin the reference repeats the last value.
    for i, k in enumerate(pages):
        assert s.budget_at(i * 2000) == s.budget_at(i * 2000 + 1999) == (k + 3) * 16
    assert s.budget_at(20 * 2000) == s.budget_at(10**7) == (pages[-1] + 3) * 16


def test_the_8b_preset_keeps_the_references_6208():
    assert PRESETS["qwen3-8b-0.86"].budgets[17] == 6208


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
