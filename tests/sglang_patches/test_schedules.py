from __future__ import annotations

import json

import pytest

from sglang_patches.schedules import (
    CUSTOM_PARAM_KEY,
    DEFAULT_SCHEDULE_ENV,
    parse_schedule,
    request_schedule,
    server_default_schedule,
    validate_request,
)
from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule
from sparrow_megatron.sparsity.selection import PageGeometry


def test_dense_and_presets():
    assert parse_schedule("dense") is None
    assert parse_schedule("qwen3-4b-0.86") == PRESETS["qwen3-4b-0.86"]


def test_inline_json_and_file(tmp_path):
    schedule = Schedule(budgets=(None, 64), bin_width=128, name="x")
    assert parse_schedule(json.dumps(schedule.to_dict())) == schedule
    path = schedule.save(tmp_path / "s.yaml")
    assert parse_schedule(str(path)) == schedule


def test_server_default_and_request_override(monkeypatch):
    monkeypatch.delenv(DEFAULT_SCHEDULE_ENV, raising=False)
    assert server_default_schedule() is None
    assert request_schedule(None) is None
    monkeypatch.setenv(DEFAULT_SCHEDULE_ENV, "qwen3-8b-0.86")
    assert request_schedule(None) == PRESETS["qwen3-8b-0.86"]
    assert request_schedule({}) == PRESETS["qwen3-8b-0.86"]
    assert request_schedule({CUSTOM_PARAM_KEY: "dense"}) is None
    assert request_schedule({CUSTOM_PARAM_KEY: "qwen3-1.7b-0.86"}) == PRESETS["qwen3-1.7b-0.86"]


def test_bad_server_default_names_the_variable(monkeypatch):
    monkeypatch.setenv(DEFAULT_SCHEDULE_ENV, "nope")
    with pytest.raises(UserError, match=DEFAULT_SCHEDULE_ENV):
        server_default_schedule()


def test_validate_request_raises_value_error():
    validate_request(None)
    validate_request({"other": 1})
    with pytest.raises(ValueError, match=f"custom_params.{CUSTOM_PARAM_KEY}: .*unknown schedule"):
        validate_request({CUSTOM_PARAM_KEY: "nope"})
    with pytest.raises(ValueError, match="non-empty string"):
        validate_request({CUSTOM_PARAM_KEY: ["a"]})


def test_page_size_must_match_server():
    spec = json.dumps(Schedule(budgets=(128,), geometry=PageGeometry(page_size=32)).to_dict())
    with pytest.raises(UserError, match="page_size 32 differs from the server's KV page size 16"):
        parse_schedule(spec)
