"""The job config's `reward` section: validation messages name the field; the sandbox gets its values."""

import pytest

from sparrow_megatron.config import load_config
from sparrow_megatron.errors import UserError
from sparrow_megatron.reward.code_reward import CodeRewardConfig
from sparrow_megatron.reward.config import RewardConfig
from sparrow_megatron.reward.sandbox import MIB


def test_defaults_are_valid_and_isolated():
    cfg = RewardConfig()
    assert cfg.problems() == []
    assert cfg.isolation == "bwrap"
    assert cfg.mlflow_tags() == {"reward.isolation": "bwrap"}


def test_problems_name_the_field():
    cfg = RewardConfig(
        timeout_s=0, memory_mb=0, workers=-1, float_tolerance=2.0, cgroup_parent="relative/dir"
    )
    problems = cfg.problems()
    for name in ("timeout_s", "memory_mb", "workers", "float_tolerance", "cgroup_parent"):
        assert any(p.startswith(f"field 'reward.{name}': ") for p in problems), name
    assert len(problems) == 5


def test_the_job_config_refuses_a_bad_section_naming_the_field():
    with pytest.raises(
        UserError, match=r"field 'reward.isolation': expected one of 'bwrap', 'unsafe', got 'auto'"
    ):
        load_config(None, ["reward.isolation=auto"])
    with pytest.raises(UserError, match=r"field 'reward.timeout_s': must be a positive number, got 0"):
        load_config(None, ["reward.timeout_s=0"])
    assert load_config(None, ["reward.isolation=unsafe"]).reward.isolation == "unsafe"


def test_unsafe_is_tagged_and_reaches_the_sandbox():
    cfg = RewardConfig(isolation="unsafe", timeout_s=2.5, memory_mb=256, max_output_mb=2, all_or_nothing=True)
    assert cfg.mlflow_tags()["reward.isolation"] == "unsafe"
    assert "WITHOUT isolation" in cfg.mlflow_tags()["reward.unsafe_warning"]
    code = CodeRewardConfig.from_section(cfg)
    assert code.all_or_nothing and code.float_tolerance == 1e-6
    sb = code.sandbox
    assert (sb.isolation, sb.timeout_s, sb.memory_mb, sb.max_output_bytes) == ("unsafe", 2.5, 256, 2 * MIB)
