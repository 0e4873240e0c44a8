"""loop.overlap on the loop's own step (loop/run.py `_step` and loop/overlap.py) with stand-ins for the
fleet, the trainer and the controller: which weights generate which batch, when it is generated, which
dense reference its tails use, and from which batch a controller decision applies."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from sparrow_megatron.config import load_config
from sparrow_megatron.loop.collect import Collected
from sparrow_megatron.loop.config import MonitorConfig
from sparrow_megatron.loop.monitor import TailMonitor
from sparrow_megatron.loop.overlap import Batch, RolloutSide
from sparrow_megatron.loop.run import Loop
from sparrow_megatron.rollout.types import Sample

K = 4


class Fleet:
    """The fleet's weight versions: a sync bumps them, as RolloutFleet does."""

    def __init__(self):
        self.weight_version = 0
        self.log: list[str] = []

    def sync(self, _buckets) -> None:
        self.weight_version += 1
        self.log.append(f"sync v{self.weight_version}")


def _sample(version: int, shift: float) -> Sample:
    """Two response tokens after a 1100-token prompt; the engine's top-K moved by `shift` in log space."""
    ids = [[0, 1, 2, 3]] * 2
    lps = torch.log_softmax(torch.tensor([2.0, 1.0 + shift, 0.5, 0.1]), -1).tolist()
    return Sample(
        0, 0, [5] * 1100, [0, 1], [lps[0], lps[1]], ids, [lps] * 2, "stop", 0, version, "s", None, 0.1
    )


class Policy:
    """The trainer: dense top-K equal to the engine's unshifted distribution; records what it saw."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.version = 0  # updates done

    def score(self, batch, top_k=None):
        lps = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.1]), -1).double()
        n = len(batch.response_ids)
        return SimpleNamespace(
            logprobs=[torch.zeros(2)] * n,
            topk_ids=[torch.arange(K).repeat(2, 1)] * n if top_k != 0 else None,
            topk_logprobs=[lps.repeat(2, 1)] * n if top_k != 0 else None,
        )

    def train_step(self, batch):
        self.version += 1
        self.fleet.log.append(f"update {self.version}")
        return {"loss": 0.0}

    def iter_hf_weights(self):
        return []


class Controller:
    """Decides a new schedule label after every step: `after-<step>`."""

    def update(self, step, p5_by_bin, bin_width):
        return f"after-{step}", [f"change at {step}"]


def _loop(mode: str, fleet: Fleet, generated: list) -> Loop:
    cfg = load_config(None, [f"loop.overlap={mode}", f"rollout.top_k_logprobs={K}"], check_paths=False)
    loop = Loop.__new__(Loop)  # the step alone: no run directory, engines or trainer
    loop.cfg, loop.distill = cfg, None
    loop._sync = SimpleNamespace(push=lambda policy: fleet.sync(()) or {}, catch_up=lambda policy: 0)
    side = RolloutSide(mode, cfg, None, None, fleet, None, last_step=4)

    def generate(step, schedule):
        version = fleet.weight_version
        generated.append((step, schedule, version, threading.current_thread().name, len(fleet.log)))
        got = Collected([_sample(version, 0.0)], [1.0], [0], 0, 0, 1.0)
        # one_step's dense reference: the engines' own dense top-K at the sampling weights (unshifted).
        dense = [(torch.arange(K).repeat(2, 1), torch.tensor(got.samples[0].top_logprobs).double())]
        return Batch(step, got, version, dense if mode == "one_step" else None, {"generate": 0.0}, (0.0, 0.0))

    side._generate = generate
    loop._rollout = side
    return loop


@pytest.mark.parametrize("mode", ["none", "one_step"])
def test_which_weights_generate_which_batch_and_when_decisions_apply(mode):
    fleet, generated = Fleet(), []
    loop = _loop(mode, fleet, generated)
    policy, monitor = Policy(fleet), TailMonitor(MonitorConfig(bin_width=2000, min_bin_tokens=1))
    schedule, rows = "initial", []
    for step in range(1, 5):
        metrics, schedule, changes = loop._step(step, fleet, policy, monitor, schedule, Controller())
        assert changes == [f"change at {step}"]
        rows.append(metrics)
    steps, schedules, versions, threads, _ = zip(*generated, strict=True)
    assert steps == (1, 2, 3, 4)
    # The controller's decision on batch n applies from the next generated batch, n+1, in both modes.
    assert schedules == ("initial", "after-1", "after-2", "after-3")
    assert [r["rollout/weight_version"] for r in rows] == [1, 2, 3, 4]
    if mode == "none":
        assert versions == (0, 1, 2, 3)  # batch n from the weights of update n-1
        assert [r["rollout/policy_lag"] for r in rows] == [0, 0, 0, 0]
        assert all(t == threading.current_thread().name for t in threads)
    else:
        # Batch n+1 is generated during step n (after its tails, before its sync) from update n-1.
        assert versions == (0, 0, 1, 2)
        assert [r["rollout/batch_weight_version"] for r in rows] == [0, 0, 1, 2]
        assert [r["rollout/policy_lag"] for r in rows] == [0, 1, 1, 1]
        assert threads[1:] == ("rollout-step-2", "rollout-step-3", "rollout-step-4")
        assert fleet.log == [f"{what} {n}" if what == "update" else f"sync v{n}"
                             for n in range(1, 5) for what in ("update", "sync")]  # fmt: skip
        assert all(0.0 <= r["time/overlap_frac"] <= 1.0 for r in rows)
    # The tails: under none the trainer's dense scores (equal to the engine's here), under one_step the
    # engines' dense reference at the sampling weights; either way sampled == reference: acceptance 1.
    assert all(r["tail_bin_00000/p5"] == pytest.approx(1.0) for r in rows)


def test_a_checkpoint_carries_the_prefetched_batch(tmp_path):
    fleet, generated = Fleet(), []
    loop = _loop("one_step", fleet, generated)
    policy, monitor = Policy(fleet), TailMonitor(MonitorConfig(bin_width=2000, min_bin_tokens=1))
    loop._step(1, fleet, policy, monitor, None, None)
    loop._rollout.save(tmp_path)  # after step 1: batch 2 exists, generated by the base weights
    resumed = _loop("one_step", Fleet(), [])
    resumed._rollout.load(tmp_path)
    batch = resumed._rollout.take(2, None)
    assert (batch.step, batch.weight_version) == (2, 0)
    assert batch.got.samples[0].output_ids == [0, 1]


def test_one_step_goes_with_distill_and_a_bad_checkpoint_interval_is_refused_naming_the_field():
    from sparrow_megatron.errors import UserError

    overrides = ["loop.overlap=one_step", "distill.enabled=true", "rollout.schedule=qwen3-1.7b-0.86"]
    cfg = load_config(None, overrides, check_paths=False)
    assert cfg.loop.overlap == "one_step" and cfg.distill.enabled
    with pytest.raises(UserError, match="field 'loop.checkpoint_every_s'"):
        load_config(None, ["loop.checkpoint_every_s=-1"], check_paths=False)
