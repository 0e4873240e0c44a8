"""Routing, retry and adapter rules of the fleet, isolated from servers (engines that fail on purpose)."""

import dataclasses

import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.rollout import (
    ACTIVE,
    FleetOptions,
    RolloutConfig,
    RolloutError,
    RolloutFleet,
    SamplingParams,
)
from sparrow_megatron.rollout.engine import Engine, EngineFailure
from sparrow_megatron.rollout.fleet import NoEngineAvailable


class DownEngine(Engine):
    """An attached engine that never answers (connection refused), as a crashed remote server does."""

    def generate(self, *args, **kwargs):
        raise EngineFailure(f"{self.url}/generate: connection refused")

    def check_health(self, timeout_s: float = 10.0) -> bool:
        return False


def fleet_of(n: int, **kw) -> RolloutFleet:
    urls = [f"http://127.0.0.1:{9 + i}" for i in range(n)]
    options = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(FleetOptions)}}
    rollout = RolloutConfig(urls=urls, timeout_s=1, **kw)
    fleet = RolloutFleet(rollout, FleetOptions(health_interval_s=0, startup_timeout_s=1, **options))
    fleet.engines = [DownEngine(i, url) for i, url in enumerate(fleet.rollout.urls)]
    return fleet


def test_least_loaded_engine_first_and_failed_engines_avoided():
    fleet = fleet_of(3)
    a, b, c = fleet.engines
    a.inflight, b.inflight, c.inflight = 2, 0, 1
    assert fleet._acquire(set()) is b
    assert fleet._acquire({1}) is c  # b failed this request before: the next least loaded
    assert fleet._acquire({0, 1, 2}).engine_id in (0, 1, 2)  # everyone failed: any engine beats none


def test_stale_or_dead_engines_get_no_requests():
    fleet = fleet_of(2)
    fleet.weight_version = 1
    fleet.engines[0].weight_version = 1
    assert fleet._acquire(set()).engine_id == 0  # engine 1 still has v0 weights
    fleet.engines[0].healthy = False
    with pytest.raises(NoEngineAvailable, match="engine 1 healthy=True weights=v0"):
        fleet._acquire(set())


def test_request_failing_on_every_engine_raises_with_every_reason():
    fleet = fleet_of(2, max_attempts=3)
    with pytest.raises(RolloutError) as info:
        fleet.generate([[1, 2, 3], [4]], SamplingParams(max_new_tokens=2))
    text = str(info.value)
    assert "2 of 2 requests failed" in text
    assert "prompt 0 sample 0: attempt 1 on engine" in text and "connection refused" in text
    assert "prompt 1 sample 0:" in text


def test_adapters_serve_the_sparse_path_only():
    fleet = fleet_of(1)
    fleet.adapters = {"distill-v3": "/a"}
    fleet.active_adapter = "distill-v3"
    assert fleet.resolve_adapter(None, ACTIVE) is None
    assert fleet.resolve_adapter("dense", ACTIVE) is None
    assert fleet.resolve_adapter("qwen3-4b-0.86", ACTIVE) == "distill-v3"
    assert fleet.resolve_adapter("qwen3-4b-0.86", None) is None
    with pytest.raises(UserError, match="dense path"):
        fleet.resolve_adapter(None, "distill-v3")
    with pytest.raises(UserError, match="not loaded"):
        fleet.resolve_adapter("qwen3-4b-0.86", "distill-v1")


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="model_path"):
        RolloutFleet(RolloutConfig(), FleetOptions())
    with pytest.raises(UserError, match="one address"):
        RolloutFleet(RolloutConfig(), FleetOptions(model_path="m", host="0.0.0.0"))
    with pytest.raises(UserError, match="field 'rollout.engines': must be >= 1"):
        RolloutFleet(RolloutConfig(engines=0), FleetOptions(model_path="m"))


def test_retry_waits_for_a_busy_engine_rather_than_the_one_that_failed():
    import threading

    fleet = fleet_of(2, max_inflight_per_engine=1)
    fleet.engines[1].inflight = 1  # engine 1 is full; engine 0 just failed this request
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("engine", fleet._acquire({0})))
    t.start()
    t.join(timeout=0.3)
    assert t.is_alive()  # not handed back to engine 0
    fleet._release(fleet.engines[1])
    t.join(timeout=5)
    assert got["engine"].engine_id == 1


def test_engines_of_a_node_take_disjoint_gpus():
    fleet = RolloutFleet(RolloutConfig(engines=4, engine_tp=2), FleetOptions(model_path="m", device="cuda"))
    gpus = [fleet._engine_options(i).extra_server_args for i in range(4)]
    assert [args[args.index("--base-gpu-id") + 1] for args in gpus] == ["0", "2", "4", "6"]
    cpu = RolloutFleet(RolloutConfig(engines=2), FleetOptions(model_path="m", device="cpu"))
    assert "--base-gpu-id" not in cpu._engine_options(1).extra_server_args


class _Answer:
    def __init__(self, body):
        self.body = body

    def json(self):
        return self.body


class ReattachedEngine(Engine):
    """An attached engine whose launcher restarted it: healthy again, reporting its own weight version."""

    def __init__(self, engine_id, url, reported: str, loras=()):
        super().__init__(engine_id, url)
        self.reported, self.loras, self.loaded = reported, list(loras), []
        self.client = self  # /model_info and /v1/models answered here

    def get(self, url, timeout=None):
        if url.endswith("/model_info"):
            return _Answer({"weight_version": self.reported})
        return _Answer({"data": [{"id": "base"}, *({"id": n} for n in self.loras)]})

    def check_health(self, timeout_s: float = 10.0) -> bool:
        return True

    def control(self, endpoint, payload=None, timeout_s=None):
        self.loaded.append((endpoint, payload["lora_name"]))


def test_a_reattached_engine_is_admitted_at_the_version_it_reports_and_gets_the_adapters_back():
    fleet = fleet_of(2)
    fleet.weight_version = 3
    fleet.engines[0].healthy = False  # engine 0 is down for the whole test
    fleet.adapters = {"distill-v3": "/a/v3"}
    back = ReattachedEngine(1, fleet.rollout.urls[1], reported="0")
    fleet.engines[1] = back
    back.healthy, back.weight_version = False, 3  # it was serving v3 when it went away
    assert fleet._probe(back, "test")
    assert back.healthy and back.weight_version == 0  # base weights: not routable
    assert fleet.stale_engines() == [back]
    assert back.loaded == [("load_lora_adapter", "distill-v3")]
    with pytest.raises(NoEngineAvailable, match="engine 1 healthy=True weights=v0"):
        fleet._acquire(set())  # engine 0 is down, engine 1 is stale: nobody serves v3

    current = ReattachedEngine(1, fleet.rollout.urls[1], reported="3", loras=["distill-v3"])
    fleet.engines[1] = current
    current.healthy = False
    fleet._probe(current, "test")
    assert current.weight_version == 3 and fleet.stale_engines() == [] and current.loaded == []
    assert fleet._acquire(set()) is current


class FailingUpdateEngine(Engine):
    """Accepts the update session, then fails every bucket (an engine dying mid-sync)."""

    def drain(self, timeout_s: float) -> None:
        pass

    def control(self, endpoint: str, payload: dict, timeout_s: float | None = None):
        if endpoint == "update_weights_from_tensor":
            raise EngineFailure(f"{self.url}/{endpoint}: connection reset")
        return {"success": True}


def test_http_sync_lost_on_every_engine_still_walks_the_collective_bucket_iterator():
    """The bucket iterator is collective on the trainer ranks: a sync that fails must consume it to the
    end, or the other ranks hang in their next gather."""
    import torch

    fleet = fleet_of(2)
    fleet.engines = [FailingUpdateEngine(i, url) for i, url in enumerate(fleet.rollout.urls)]
    walked = []

    def buckets():
        for k in range(4):
            walked.append(k)
            yield [(f"w{k}", torch.zeros(2))]

    with pytest.raises(EngineFailure, match="update_weights_from_tensor failed on every engine"):
        fleet.sync_weights(buckets())
    assert walked == [0, 1, 2, 3]
    assert fleet.weight_version == 0 and not any(e.healthy for e in fleet.engines)


class RecordingEngine(Engine):
    """Accepts every control call and records it (what the engine would be told, in order)."""

    def drain(self, timeout_s: float) -> None:
        self.calls = [*getattr(self, "calls", []), ("flush_cache", {"timeout": timeout_s})]

    def control(self, endpoint: str, payload: dict, timeout_s: float | None = None):
        self.calls = [*getattr(self, "calls", []), (endpoint, dict(payload))]
        return {"success": True}


def test_http_sync_gives_the_engine_its_new_version_only_after_the_last_bucket():
    """An engine lost mid-sync must still report its old version when it answers again (it is then
    caught up before it serves), so no bucket carries the version: it is stamped once all are in."""
    import torch

    fleet = fleet_of(1)
    fleet.engines = [RecordingEngine(0, fleet.rollout.urls[0])]
    version = fleet.sync_weights(iter([[("a", torch.zeros(2))], [("b", torch.ones(2))]]))
    calls = fleet.engines[0].calls
    assert [c[0] for c in calls] == [
        "flush_cache",  # drained first: requests a client dropped would make the update fail
        "begin_weight_update",
        "update_weights_from_tensor",
        "update_weights_from_tensor",
        "end_weight_update",
        "update_weight_version",
    ]
    assert not any("weight_version" in payload for _, payload in calls[:-1])
    assert calls[-1][1]["new_version"] == str(version) == "1"


class BusyEngine(RecordingEngine):
    """Still running requests when the drain's time is up (SGLang answers the deferred flush with 400)."""

    def drain(self, timeout_s: float) -> None:
        raise EngineFailure(f"{self.url}/flush_cache: still running requests after {timeout_s:g} s")


def test_an_engine_that_does_not_drain_is_left_stale_and_the_others_are_updated():
    import torch

    fleet = fleet_of(2)
    busy, ready = BusyEngine(0, fleet.rollout.urls[0]), RecordingEngine(1, fleet.rollout.urls[1])
    fleet.engines = [busy, ready]
    assert fleet.sync_weights(iter([[("a", torch.zeros(2))]])) == 1
    assert not busy.healthy and not getattr(busy, "calls", [])  # no update sent to it
    assert ready.healthy and ready.weight_version == 1 and ready.calls[0][0] == "flush_cache"


class FakeServer:
    """A launched server whose start either works or exits at once (its port taken before it bound)."""

    def __init__(self, port: int, starts: bool):
        self.port, self.starts, self.killed = port, starts, False
        self.url = f"http://127.0.0.1:{port}"

    def alive(self) -> bool:
        return self.starts and not self.killed

    def kill(self, grace_s: float = 10.0) -> None:
        self.killed = True

    def wait_healthy(self, timeout_s: float) -> None:
        if not self.starts:
            from sparrow_megatron.rollout.server import EngineStartError

            raise EngineStartError(
                f"SGLang server on port {self.port} exited with code 3: address already in use"
            )


def test_a_restart_whose_server_exits_while_starting_tries_again_on_another_port(monkeypatch):
    from sparrow_megatron.rollout import fleet as fleet_module

    fleet = fleet_of(1)
    engine = fleet.engines[0]
    engine.server = FakeServer(40491, starts=True)
    engine.server.killed = True  # the engine that died
    launched = []

    def launch(rollout, options, port, log_path, model_path):
        launched.append(port)
        return FakeServer(port, starts=len(launched) > 1)

    monkeypatch.setattr(fleet_module.ServerProcess, "launch", staticmethod(launch))
    fleet._restarting.add(0)
    fleet._restart(engine, "test")
    assert len(launched) == 2 and launched[0] != launched[1]
    assert engine.healthy and engine.server.port == launched[1] and fleet.restarts[0][0] == 0
    # A free port is picked below the kernel's ephemeral range, where outgoing connections cannot take it.
    from sparrow_megatron.rollout.server import _ephemeral_low

    assert launched[1] < _ephemeral_low()
