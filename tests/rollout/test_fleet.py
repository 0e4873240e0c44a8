"""The fleet against real SGLang servers: top-K log-probs, acceptance tails, weight sync, faults.

Tests in this module share one 2-engine fleet and run in file order: the weight tests leave the fleet
on the original checkpoint (by a disk sync) so the fault test after them sees known weights.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from sparrow_megatron.rollout import RolloutError, SamplingParams, topk_tensors
from sparrow_megatron.sparsity.acceptance import acceptance_from_topk
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.tails import tail_report, token_positions
from tests.rollout.conftest import hf_greedy, load_hf, state_buckets

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(900)]

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
PROMPTS = [[10, 11, 12, 13, 14], [40, 41, 42], [70, 5, 71, 6, 72, 7, 73]]
# Budget 48 = sink 1 + local 2 pages: the smallest legal budget, sparse once a request passes 48 tokens.
TINY_BUDGET = Schedule.fixed(48, dense_layers=(0,), name="tiny-48")


def test_topk_logprobs_per_token_consistent_with_sampled_logprob(fleet):
    completed = []  # on_sample: each sample handed on as it completes (the loop judges it meanwhile)
    batch = fleet.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True), n=2,
                           on_sample=completed.append)  # fmt: skip
    assert [len(g) for g in batch.samples] == [2, 2, 2]
    assert sorted(map(id, completed)) == sorted(map(id, batch.flat()))
    for s in batch.flat():
        assert s.prompt_ids == PROMPTS[s.prompt_index]
        assert len(s.output_ids) == len(s.logprobs) == len(s.top_ids) == 10
        assert s.finish_reason == "length"
        assert s.engine_id in (0, 1) and s.weight_version == 0
        for t, tok in enumerate(s.output_ids):
            ids, lps = s.top_ids[t], s.top_logprobs[t]
            assert len(ids) == 20 and len(set(ids)) == 20
            assert lps == sorted(lps, reverse=True)
            assert sum(math.exp(x) for x in lps) <= 1.0 + 1e-4
            if tok in ids:  # the sampled token's log-prob is the same number in both lists
                assert s.logprobs[t] == pytest.approx(lps[ids.index(tok)], abs=1e-5)
            else:
                assert s.logprobs[t] <= lps[-1] + 1e-5
    assert sum(st.output_tokens for st in batch.engine_stats.values()) == 60
    assert all(st.tokens_per_s > 0 for st in batch.engine_stats.values() if st.requests)


def test_seeded_samples_do_not_depend_on_what_the_engines_served_before(fleet):
    hot = SamplingParams(temperature=1.5, max_new_tokens=12, ignore_eos=True, seed=1234)
    first = [s.output_ids for s in fleet.generate(PROMPTS, hot, n=2).flat()]
    fleet.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=7), n=3)  # moves any RNG stream
    again = [s.output_ids for s in fleet.generate(PROMPTS, hot, n=2).flat()]
    assert first == again
    assert len({tuple(ids) for ids in first}) > 1  # each sample has its own seed (seed + i * n + j)
    other = [s.output_ids for s in fleet.generate(PROMPTS, replace(hot, seed=99), n=2).flat()]
    assert other != first


def test_health_probes_run_no_generation(fleet):
    """A probe's one-token generation would join the next batch and change a seeded sample's bits."""
    engine = fleet.engines[0]

    def prefills() -> int:
        time.sleep(1.0)  # the server's log lines of what it just ran
        return engine.server.log_path.read_text(errors="replace").count("Prefill batch")

    before = prefills()
    assert all(engine.check_health() for _ in range(3))
    assert prefills() == before
    assert engine.client.get(f"{engine.url}/health_generate", timeout=30).status_code == 200
    assert prefills() == before + 1  # the startup check's endpoint does generate, and shows in the log


def test_greedy_token_is_top1_and_matches_hf(fleet, tiny_model):
    batch = fleet.generate(PROMPTS, GREEDY)
    hf = load_hf(tiny_model)
    for s in batch.flat():
        assert [row[0] for row in s.top_ids] == s.output_ids
        assert s.output_ids == hf_greedy(hf, s.prompt_ids, GREEDY.max_new_tokens)


def test_acceptance_tails_dense_vs_sparse_on_real_output(fleet):
    """Sparse rollout, then the dense distribution at the same positions (teacher-forced on the sparse
    tokens); acceptance and its tails by position, all from real server output.

    The tiny random model is nearly uniform (top-20 holds ~20% of the mass), so the lists here cover the
    whole vocabulary (K = 128): alpha is then exact, and the production K = 20 bounds must bracket it.
    """
    vocab = 128
    prompt = [(7 * i) % 90 + 5 for i in range(60)]  # past the 48-token budget: every decode step is sparse
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, ignore_eos=True)
    sparse = fleet.generate([prompt], sampling, n=2, schedule=TINY_BUDGET, top_logprobs=vocab).flat()
    alphas, lowers, uppers = [], [], []
    for s in sparse:
        assert s.schedule == "tiny-48"
        dense = fleet.score(s.prompt_ids, s.output_ids, top_logprobs=vocab)  # no schedule: dense
        assert dense.output_ids == s.output_ids and len(dense.top_ids) == s.response_len
        q_ids, q_lps = topk_tensors(s)
        p_ids, p_lps = dense.topk_tensors()
        exact, lo_full, up_full = acceptance_from_topk(p_ids, p_lps, q_ids, q_lps)
        assert torch.allclose(lo_full, up_full, atol=1e-4)  # full lists: the bounds meet
        est, lo, up = acceptance_from_topk(p_ids[:, :20], p_lps[:, :20], q_ids[:, :20], q_lps[:, :20])
        assert torch.all(lo <= exact + 1e-6) and torch.all(exact <= up + 1e-6)
        assert torch.all(lo <= est + 1e-9) and torch.all(est <= up + 1e-9)
        alphas.append(exact.numpy())
        lowers.append(lo.numpy())
        uppers.append(up.numpy())
    # Dense rescoring of a dense sample reproduces its distribution: alpha 1 up to float noise.
    d = fleet.generate([prompt], GREEDY, top_logprobs=vocab).flat()[0]
    rescored = fleet.score(d.prompt_ids, d.output_ids, top_logprobs=vocab)
    self_alpha, _, _ = acceptance_from_topk(*rescored.topk_tensors(), *topk_tensors(d))
    assert float(self_alpha.min()) > 0.999

    positions = token_positions([len(prompt)] * len(sparse), [s.response_len for s in sparse])
    report = tail_report(np.concatenate(alphas), positions, bin_width=16,
                         lower=np.concatenate(lowers), upper=np.concatenate(uppers), tau=0.86)  # fmt: skip
    assert report.tokens == 48 and sum(b.count for b in report.bins) == 48
    assert [b.start for b in report.bins] == [48, 64, 80]
    for b in report.bins:
        assert 0.0 <= b.p5_lower <= b.p5 + 1e-6 and b.p5 <= b.p5_upper + 1e-6 <= 1.0 + 1e-6


def test_invalid_request_raises_without_retry_and_fleet_keeps_serving(fleet):
    from sparrow_megatron.rollout import RequestRejected

    with pytest.raises(RequestRejected):
        fleet.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, top_p=7.0))
    assert fleet.generate([[1, 2, 3]], GREEDY).flat()[0].response_len == 12


def test_weight_update_from_tensors_then_disk_fallback(fleet, tiny_model, tiny_model_b):
    hf_a, hf_b = load_hf(tiny_model), load_hf(tiny_model_b)
    want_a = [hf_greedy(hf_a, p, GREEDY.max_new_tokens) for p in PROMPTS]
    want_b = [hf_greedy(hf_b, p, GREEDY.max_new_tokens) for p in PROMPTS]
    assert want_a != want_b  # the update must be visible

    version = fleet.sync_weights(state_buckets(tiny_model_b, bucket_size=5))
    batch = fleet.generate(PROMPTS, GREEDY, n=2)
    assert {s.engine_id for s in batch.flat()} == {0, 1}  # both engines got the new weights
    for s in batch.flat():
        assert s.weight_version == version == 1
        assert s.output_ids == want_b[s.prompt_index]

    version = fleet.sync_weights_from_disk(tiny_model)
    batch = fleet.generate(PROMPTS, GREEDY, n=2)
    for s in batch.flat():
        assert s.weight_version == version == 2
        assert s.output_ids == want_a[s.prompt_index]


def test_kill_one_engine_mid_batch_completes_on_the_other_and_restarts_it(fleet, tiny_model):
    want = fleet.generate(PROMPTS, GREEDY).flat()
    victim = fleet.engines[0]
    old_pid = victim.server.pid
    sampling = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
    prompts = PROMPTS * 6
    result: dict = {}

    def run():
        try:
            result["batch"] = fleet.generate(prompts, sampling)
        except BaseException as err:  # surfaced below
            result["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while victim.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.inflight > 0, "engine 0 never received a request"
    os.killpg(old_pid, signal.SIGKILL)
    worker.join(timeout=600)
    assert not worker.is_alive()
    assert "error" not in result, result.get("error")
    batch = result["batch"]
    samples = batch.flat()
    assert len(samples) == len(prompts)  # nothing dropped
    assert any(s.attempts > 1 and s.engine_id == 1 for s in samples)  # re-queued from the dead engine
    for s in samples:
        assert s.output_ids[:12] == want[s.prompt_index % len(PROMPTS)].output_ids
    assert batch.engine_stats[0].failures > 0

    fleet.wait_restarts(timeout_s=600)
    assert victim.server.pid != old_pid and victim.healthy
    assert [r[0] for r in fleet.restarts] == [0]
    # The restarted engine loads the last disk checkpoint at the fleet's version, so it serves again.
    assert victim.weight_version == fleet.weight_version
    again = fleet.generate(PROMPTS * 4, GREEDY).flat()
    assert {s.engine_id for s in again} == {0, 1}
    for s in again:
        assert s.output_ids == want[s.prompt_index % len(PROMPTS)].output_ids


def test_a_request_that_fails_everywhere_raises_with_the_reason(fleet):
    # A timeout far below one decode step on every engine: each attempt fails, the batch raises.
    for e in fleet.engines:
        e.timeout_s = 1e-4
    try:
        with pytest.raises(RolloutError, match=r"prompt 0 sample 0: .*timed out"):
            fleet.generate([[1, 2, 3]], SamplingParams(max_new_tokens=200, ignore_eos=True))
    finally:
        for e in fleet.engines:
            e.timeout_s = fleet.rollout.timeout_s
    fleet.check_engines()
    assert fleet.generate([[1, 2, 3]], GREEDY).flat()[0].response_len == 12


class _Policy:
    """The trainer side of a sync, isolated: a checkpoint's buckets and its HF export."""

    def __init__(self, path):
        self.path = path

    def iter_hf_weights(self, bucket_bytes: int, to_host: bool = True):
        return state_buckets(self.path, bucket_size=7)

    def export_hf(self, out):
        shutil.copytree(self.path, out)


def test_loop_weight_sync_http_sends_one_copy_per_engine_and_disk_writes_one_snapshot(
    fleet, tiny_model, tiny_model_b, tmp_path
):
    from sparrow_megatron.loop.weight_sync import WeightSync

    want_a = [hf_greedy(load_hf(tiny_model), p, GREEDY.max_new_tokens) for p in PROMPTS]
    want_b = [hf_greedy(load_hf(tiny_model_b), p, GREEDY.max_new_tokens) for p in PROMPTS]
    raw = _nbytes(state_buckets(tiny_model_b))
    metrics = WeightSync("http", fleet, tmp_path).push(_Policy(tiny_model_b))
    # base64 of a pickle: the raw bytes x 4/3 plus framing, once per engine (2 engines)
    assert 2 * raw * 4 / 3 <= metrics["sync/bytes"] < 2 * raw * 4 / 3 * 1.05
    for s in fleet.generate(PROMPTS, GREEDY, n=2).flat():
        assert s.weight_version == fleet.weight_version and s.output_ids == want_b[s.prompt_index]

    disk = WeightSync("disk", fleet, tmp_path)
    for _ in range(2):
        metrics = disk.push(_Policy(tiny_model))
    snapshot = tmp_path / "weight_sync" / f"v{fleet.weight_version:06d}"
    assert [p.name for p in snapshot.parent.iterdir()] == [snapshot.name]  # the older one is gone
    assert metrics["sync/bytes"] == (snapshot / "model.safetensors").stat().st_size  # written once
    batch = fleet.generate(PROMPTS, GREEDY, n=2)
    assert {s.engine_id for s in batch.flat()} == {0, 1}
    for s in batch.flat():
        assert s.weight_version == fleet.weight_version and s.output_ids == want_a[s.prompt_index]


def _nbytes(buckets) -> int:
    return sum(t.numel() * t.element_size() for b in buckets for _, t in b)


def test_weight_update_over_a_process_group_survives_a_lost_engine(fleet, tiny_model, tiny_model_b):
    """The update_weights_from_distributed path. GPU fleets use NCCL; on CPU the same code runs over
    gloo: the engines join the trainer's group and receive each bucket as one flat broadcast.

    An engine killed in the middle of a sync is dropped from it (the sync runs again on a rebuilt group
    with the survivor); once restarted it is stale (base weights), gets no requests, and catch_up
    rebuilds the group with it and brings it to the current version before it serves."""
    from sparrow_megatron.rollout import DistributedGroupSpec
    from sparrow_megatron.rollout.server import free_port

    want_a = [hf_greedy(load_hf(tiny_model), p, GREEDY.max_new_tokens) for p in PROMPTS]
    want_b = [hf_greedy(load_hf(tiny_model_b), p, GREEDY.max_new_tokens) for p in PROMPTS]
    spec = DistributedGroupSpec("127.0.0.1", free_port(), group_name="sparrow_test_sync", backend="gloo")
    sync = fleet.init_distributed_sync(spec, timeout_s=120)
    assert sync.builds == 1
    version = fleet.sync_weights_distributed(lambda: state_buckets(tiny_model_b, bucket_size=7))
    # One broadcast of the weights, whatever the number of engines.
    assert fleet.last_sync_bytes == _nbytes(state_buckets(tiny_model_b)) > 0
    batch = fleet.generate(PROMPTS, GREEDY, n=2)
    assert {s.engine_id for s in batch.flat()} == {0, 1}
    for s in batch.flat():
        assert s.weight_version == version
        assert s.output_ids == want_b[s.prompt_index]

    victim, survivor = fleet.engines[1], fleet.engines[0]
    old_pid = victim.server.pid
    calls = []

    def buckets_killing_the_victim():
        calls.append(1)
        for k, bucket in enumerate(state_buckets(tiny_model, bucket_size=7)):
            if k == 2 and len(calls) == 1:  # mid-sync, on the first try only
                os.killpg(old_pid, signal.SIGKILL)
                victim.server.process.wait(timeout=30)
            yield bucket

    version = fleet.sync_weights_distributed(buckets_killing_the_victim)
    assert len(calls) == 2  # the failed try and the retry with the survivor
    assert sync.builds == 2 and sync.group.members == ((0, survivor.url),)
    assert survivor.weight_version == version and victim.weight_version != version
    batch = fleet.generate(PROMPTS, GREEDY, n=2)
    assert batch.stale_samples == 0
    for s in batch.flat():
        assert s.engine_id == 0 and s.weight_version == version
        assert s.output_ids == want_a[s.prompt_index]

    fleet.wait_restarts(timeout_s=600)
    assert victim.server.pid != old_pid and victim.healthy
    assert fleet.stale_engines() == [victim]  # restarted from the base model: not routed
    assert {s.engine_id for s in fleet.generate(PROMPTS, GREEDY, n=2).flat()} == {0}
    assert fleet.sync_weights_distributed(lambda: state_buckets(tiny_model), catch_up=True) == version
    assert sync.builds == 3 and fleet.stale_engines() == []
    batch = fleet.generate(PROMPTS, GREEDY, n=2)
    assert {s.engine_id for s in batch.flat()} == {0, 1} and batch.stale_samples == 0
    for s in batch.flat():
        assert s.weight_version == version
        assert s.output_ids == want_a[s.prompt_index]
