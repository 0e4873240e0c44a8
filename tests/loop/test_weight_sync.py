"""The loop's weight sync without engines: which fleet call each mode makes, catch-up, metrics, recipes.
(The same calls against real SGLang engines: tests/rollout/test_fleet.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from sparrow_megatron.config import load_recipe
from sparrow_megatron.loop.weight_sync import WeightSync

REPO = Path(__file__).resolve().parents[2]


class _Engine:
    def __init__(self, engine_id: int):
        self.engine_id = engine_id


class _Fleet:
    """Records the fleet calls; `stale` is what stale_engines() answers."""

    def __init__(self, version: int = 0, stale: int = 0):
        self.weight_version = version
        self.last_sync_bytes = 0
        self.stale = [_Engine(i) for i in range(stale)]
        self.calls: list[tuple] = []

    def stale_engines(self):
        return self.stale

    def sync_weights(self, buckets, catch_up=False):
        self.calls.append(("http", list(buckets), catch_up))
        self.last_sync_bytes = 123
        self.weight_version += not catch_up

    def sync_weights_from_disk(self, path, catch_up=False):
        self.calls.append(("disk", Path(path).name, catch_up))
        self.last_sync_bytes = 456
        self.weight_version += not catch_up

    def init_distributed_sync(self, spec, stages=1):
        self.calls.append(("init", spec.backend) if stages == 1 else ("init", spec.backend, stages))

    def distributed_relay(self):
        return {"attempt": f"a{len(self.calls)}"}

    def sync_weights_distributed(self, buckets, catch_up=False):
        assert callable(buckets)  # a sync that loses an engine re-gathers for the engines left
        self.calls.append(("distributed", list(buckets()), catch_up))
        self.last_sync_bytes = 789
        self.last_sync_stage_bytes = [500, 289]
        self.weight_version += not catch_up


class _Policy:
    def __init__(self):
        self.kwargs = []

    def iter_hf_weights(self, **kwargs):
        self.kwargs.append(kwargs)
        return iter([["bucket"]])

    def export_hf(self, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")


@pytest.mark.parametrize(("mode", "nbytes"), [("http", 123), ("disk", 456), ("distributed", 789)])
def test_push_reports_the_fleets_bytes_and_distributed_keeps_buckets_on_the_device(tmp_path, mode, nbytes):
    fleet, policy = _Fleet(), _Policy()
    sync = WeightSync(mode, fleet, tmp_path, bucket_mb=2)
    assert sync.push(policy) == {"sync/bytes": float(nbytes)}
    assert fleet.calls[-1][0] == mode and fleet.calls[-1][-1] is False
    if mode == "distributed":
        assert fleet.calls[0] == ("init", "gloo")  # no CUDA here: the same path over gloo
        assert policy.kwargs == [{"bucket_bytes": 2 << 20, "to_host": False, "stage_relay": None}]
    if mode == "http":
        assert policy.kwargs == [{"bucket_bytes": 2 << 20}]
    if mode == "disk":
        sync.push(policy)
        assert [p.name for p in (tmp_path / "weight_sync").iterdir()] == ["v000002"]  # one snapshot kept


def test_distributed_under_pp_gives_each_weights_call_the_stage_senders_relay(tmp_path):
    """With trainer.pp > 1 each stage's sender broadcasts its own weights: every weights call (each try
    of a sync, and catch-up) carries the fleet's relay for that attempt; the bytes are logged per stage."""
    fleet, policy = _Fleet(), _Policy()
    sync = WeightSync("distributed", fleet, tmp_path, bucket_mb=2, stages=2)
    assert fleet.calls == [("init", "gloo", 2)]
    assert sync.push(policy) == {"sync/bytes": 789.0, "sync/bytes_stage0": 500.0, "sync/bytes_stage1": 289.0}
    fleet.stale = [_Engine(1)]
    assert sync.catch_up(policy) == 1
    assert policy.kwargs == [
        {"bucket_bytes": 2 << 20, "to_host": False, "stage_relay": {"attempt": "a1"}},
        {"bucket_bytes": 2 << 20, "to_host": False, "stage_relay": {"attempt": "a2"}},
    ]


@pytest.mark.parametrize("mode", ["http", "disk", "distributed"])
def test_catch_up_sends_the_current_version_to_stale_engines_only(tmp_path, mode):
    policy = _Policy()
    fleet = _Fleet()
    sync = WeightSync(mode, fleet, tmp_path)
    sync.push(policy)
    fleet.calls.clear()
    assert sync.catch_up(policy) == 0 and fleet.calls == []  # nobody behind
    fleet.stale = [_Engine(1)]
    assert sync.catch_up(policy) == 1
    assert fleet.weight_version == 1 and fleet.calls[-1][0] == mode and fleet.calls[-1][-1] is True
    if mode == "disk":
        assert fleet.calls[-1][1] == "v000001"  # the snapshot of the current version

    fresh = _Fleet(version=0, stale=1)  # version 0 is the base model every engine starts from
    assert WeightSync(mode, fresh, tmp_path / "fresh").catch_up(policy) == 0


def test_gpu_recipes_sync_by_broadcast_and_the_cpu_default_over_http():
    for path in sorted((REPO / "recipes").glob("qwen3_*.py")):
        assert load_recipe(path).rollout.weight_sync == "distributed", path.name
    assert load_recipe(REPO / "recipes" / "tiny_cpu.py").rollout.weight_sync == "http"
