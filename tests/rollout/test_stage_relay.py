"""The pipeline stages' sender side of the distributed weight sync (rollout/stage_relay.py) against a
real TCP store and a real gloo rendezvous, without engines: a sender never outwaits rank 0's abort."""

from __future__ import annotations

import pickle
import threading

import torch

from sparrow_megatron.rollout.server import free_port
from sparrow_megatron.rollout.stage_relay import connect, follow_stage


def _relay(store, attempt: str, timeout_s: float = 60) -> dict:
    return {
        "host": "127.0.0.1",
        "port": store.port,
        "timeout_s": timeout_s,
        "backend": "gloo",
        "attempt": attempt,
    }


def _buckets(walked: list):
    for k in range(3):
        walked.append(k)  # on a real stage each step is a TP gather the other TP ranks take part in
        yield [(f"w{k}", torch.full((4,), float(k)))]


def test_a_sender_whose_group_never_meets_stops_at_the_abort_and_walks_its_buckets():
    store = connect({"host": "127.0.0.1", "port": free_port(), "timeout_s": 60}, master=True)
    # The rendezvous times out after 20 s by itself (its thread ends then); the abort must come first.
    relay, walked = _relay(store, "t.1", timeout_s=20), []
    # World 2: the engine that should join never does (it died before the rendezvous).
    store.set("t.1/plan", pickle.dumps({1: ("sparrow_test_stage_relay_1", 2)}))
    sender = threading.Thread(target=lambda: list(follow_stage(_buckets(walked), relay, 1, True)))
    sender.start()
    store.wait(["t.1/addr/1"])
    host, _, port = store.get("t.1/addr/1").decode().rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0  # where the engines would meet it
    store.set("t.1/abort", b"1")
    sender.join(timeout=10)
    assert not sender.is_alive()  # well before the rendezvous timeout
    sent, error, metas = pickle.loads(store.get("t.1/done/1"))
    assert sent == 0 and "aborted" in error and metas == 0
    assert walked == [0, 1, 2]  # the stage's gathers still ran to the end


def test_nothing_to_send_and_other_ranks_only_walk():
    store = connect({"host": "127.0.0.1", "port": free_port(), "timeout_s": 60}, master=True)
    relay, walked = _relay(store, "t.2"), []
    store.set("t.2/plan", pickle.dumps(None))  # rank 0 found no engine to build groups with
    assert list(follow_stage(_buckets(walked), relay, 1, True)) == []
    assert walked == [0, 1, 2] and pickle.loads(store.get("t.2/done/1"))[0] == 0
    walked.clear()
    assert list(follow_stage(_buckets(walked), relay, 1, False)) == [] and walked == [0, 1, 2]
    assert not store.check(["t.2/done/0"])  # a non-sender reports nothing


def test_rank0_reads_a_key_set_just_before_the_senders_report_and_fails_on_an_error_report():
    """The last bucket's end mark and the report come back to back: seeing the report first is no
    failure when the key is there too (a race seen in a PP=2 loop run); a report with an error is."""
    from sparrow_megatron.rollout.staged_sync import StagedSync
    from sparrow_megatron.rollout.weights import DistributedGroupSpec

    sync = StagedSync(
        None, DistributedGroupSpec("127.0.0.1", free_port(), backend="gloo"), stages=2, timeout_s=30
    )
    relay = sync.relay()
    store = connect(relay)
    a = relay["attempt"]
    store.set(f"{a}/meta/1/3", b"")
    store.set(f"{a}/done/1", pickle.dumps((10, "", 4)))
    failed: dict = {}
    assert sync._await(f"{a}/meta/1/3", 1, [], failed) == b"" and failed == {}
    store.set(f"{a}/done/1", pickle.dumps((0, "stage 1: RuntimeError: gloo broke", 1)))
    assert sync._await(f"{a}/meta/1/4", 1, [], failed) is None
    assert "gloo broke" in str(failed[-2])
    assert sync._reports(failed) == [0]
    assert not any(store.check([f"{a}/{k}"]) for k in ("meta/1/0", "done/1"))  # the attempt's keys are gone
