"""DistillSparse step: base frozen, adapter moves the sparse policy toward the dense one."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import PageGeometry
from sparrow_megatron.trainer import RolloutBatch
from sparrow_megatron.trainer.distill import SparseDistiller, training_schedule
from sparrow_megatron.trainer.lora import LoraSpec
from tests.trainer.policy_args import make_policy

SCHEDULE = Schedule.fixed(
    8, geometry=PageGeometry(page_size=4, sink_pages=1, local_pages=1), dense_layers=(0,)
)


def _k3(sparse, dense):
    d = torch.cat(dense) - torch.cat(sparse)
    return float((torch.exp(d) - d - 1).mean())


@pytest.fixture(scope="module")
def setup(tiny_tied):
    policy = make_policy(str(tiny_tied), lr=1e-3, micro_batch_tokens=80, seed=5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (6, 9, 5)]
    responses = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (30, 24, 27)]
    return policy, prompts, responses


def test_distill_steps_reduce_kl_and_leave_the_base_alone(setup, tmp_path):
    policy, prompts, responses = setup
    schedules = [SCHEDULE] * len(prompts)
    probe = RolloutBatch(prompts, responses)
    # Attention-only targets: the probe's p5 (3 short sequences) is checked against numbers this
    # adapter reaches in 5 steps; the all-linear default is covered by test_lora and the distill worker.
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)
    distiller = SparseDistiller(policy, spec, kl_lambda=1.0, lr=3e-3)
    try:
        dense = policy.score(probe, top_k=0).logprobs
        sparse0 = distiller.score(probe, schedules).logprobs
        # B = 0 at init: the adapter starts as a no-op on the sparse policy.
        assert all(
            torch.equal(a, b)
            for a, b in zip(sparse0, distiller.score(probe, schedules, adapter=False).logprobs, strict=True)
        )
        kl0 = _k3(sparse0, dense)
        assert kl0 > 1e-4
        base_before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        # Zero advantages isolate the KL term; the rollout log-probs are the sparse policy's own.
        batch = RolloutBatch(prompts, responses, [x.tolist() for x in sparse0], [0.0] * len(prompts))
        first = distiller.step(batch, dense, schedules)
        assert first["kl"] == pytest.approx(kl0, rel=1e-4)
        assert first["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5) and first["grad_norm"] > 0
        for _ in range(4):
            last = distiller.step(batch, dense, schedules)
        kl = _k3(distiller.score(probe, schedules).logprobs, dense)
        assert kl < 0.7 * kl0, (kl0, kl)
        assert last["kl"] < first["kl"]
        probe_metrics = distiller.probe_acceptance(probe, schedules, top_k=20)
        # The adapter pulled the sparse policy toward the dense one: its acceptance tail rose.
        assert probe_metrics["probe_p5_adapter"] > probe_metrics["probe_p5_base"]
        assert probe_metrics["probe_mean_adapter"] > probe_metrics["probe_mean_base"]
        for n, p in policy.model.named_parameters():
            assert torch.equal(p, base_before[n]), n
        # The dense policy never sees the adapter.
        assert all(
            torch.equal(a, b) for a, b in zip(policy.score(probe, top_k=0).logprobs, dense, strict=True)
        )
        # The base still trains after a distill step (its grads were not left disabled).
        metrics = policy.train_step(
            RolloutBatch(prompts, responses, [x.tolist() for x in dense], [1.0, -1.0, 0.5])
        )
        assert metrics["grad_norm"] > 0
        out = distiller.export(tmp_path / "adapter")
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    finally:
        distiller.adapter.remove()


@pytest.mark.parametrize("cap, weight", [(None, 1.0), (2.0, 2.0)])
def test_distill_uses_its_own_tis_cap(setup, cap, weight):
    # Rollout log-probs 1 below the sparse policy's own: exp(old - rollout) = e on every token, so the
    # TIS weight is the cap (distill.tis_cap, not grpo.tis_cap 3.0), or 1 when TIS is off.
    policy, prompts, responses = setup
    distiller = SparseDistiller(policy, LoraSpec(rank=2, alpha=4.0), kl_lambda=1.0, tis_cap=cap)
    try:
        schedules = [SCHEDULE] * len(prompts)
        own = distiller.score(RolloutBatch(prompts, responses), schedules).logprobs
        dense = policy.score(RolloutBatch(prompts, responses), top_k=0).logprobs
        batch = RolloutBatch(prompts, responses, [(x - 1.0).tolist() for x in own], [1.0] * len(prompts))
        metrics = distiller.step(batch, dense, schedules)
        assert metrics["tis_weight_mean"] == pytest.approx(weight, rel=1e-4)
        assert math.isfinite(metrics["loss"])
    finally:
        distiller.adapter.remove()


def test_training_schedule_replays_or_fixes_the_budget():
    growing = Schedule(budgets=(None, 8, 12), bin_width=16, geometry=SCHEDULE.geometry, dense_layers=(0,))
    assert training_schedule(growing, "replay", None) is growing
    assert training_schedule(None, "fixed", 8) is None  # a dense rollout stays dense
    fixed = training_schedule(growing, "fixed", 8)
    assert [fixed.budget_at(n) for n in (5, 20, 40, 1000)] == [8] * 4
    assert (fixed.geometry, fixed.dense_layers) == (growing.geometry, growing.dense_layers)
    assert training_schedule(growing, "fixed", None).budgets == (12,)  # null: the largest budget
    with pytest.raises(UserError, match="budget_mode"):
        training_schedule(growing, "bogus", None)


@pytest.mark.parametrize("mode", ["replay", "fixed"])
def test_distill_trains_under_the_budget_mode(setup, mode):
    # Rollout log-probs = the sparse+adapter policy's own under one fixed budget of 8: the TIS weight
    # exp(old - rollout) is exactly 1 when the step's forward uses that fixed budget, not when it
    # replays the growing schedule.
    policy, prompts, responses = setup
    growing = Schedule(budgets=(None, 8, 12), bin_width=16, geometry=SCHEDULE.geometry, dense_layers=(0,))
    distiller = SparseDistiller(
        policy, LoraSpec(rank=2, alpha=4.0), tis_cap=100.0, budget_mode=mode, fixed_budget=8
    )
    try:
        fixed = [training_schedule(growing, "fixed", 8)] * len(prompts)
        own = distiller.score(RolloutBatch(prompts, responses), fixed).logprobs
        dense = policy.score(RolloutBatch(prompts, responses), top_k=0).logprobs
        batch = RolloutBatch(prompts, responses, [x.tolist() for x in own], [1.0] * len(prompts))
        metrics = distiller.step(batch, dense, [growing] * len(prompts))
        if mode == "fixed":
            assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-6)
        else:
            assert abs(metrics["tis_weight_mean"] - 1.0) > 1e-4
    finally:
        distiller.adapter.remove()


def test_distill_takes_one_adapter_step_per_mini_batch(setup):
    policy, prompts, responses = setup
    distiller = SparseDistiller(policy, LoraSpec(rank=2, alpha=4.0, seed=1), kl_lambda=1.0, lr=3e-2)
    policy.grpo.mini_batches = 3  # no group ids: each sample is its own group, one mini-batch each
    try:
        schedules = [SCHEDULE] * len(prompts)
        base = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        own = distiller.score(RolloutBatch(prompts, responses), schedules).logprobs
        dense = policy.score(RolloutBatch(prompts, responses), top_k=0).logprobs
        batch = RolloutBatch(prompts, responses, [x.tolist() for x in own], [1.0, -1.0, 0.5])
        metrics = distiller.step(batch, dense, schedules)
        per = policy.mini_batch_metrics
        assert metrics["num_mini_batches"] == 3 and distiller.step_count == 1
        # The adapter moved after each mini-batch: later ratios are against the log-probs taken first.
        assert per[0]["approx_kl"] < 1e-9 and all(x["approx_kl"] > 1e-6 for x in per[1:])
        assert all(torch.equal(p, base[n]) for n, p in policy.model.named_parameters())
    finally:
        policy.grpo.mini_batches = 1
        distiller.adapter.remove()


def test_distill_rejects_mismatched_dense_logprobs(setup):
    policy, prompts, responses = setup
    distiller = SparseDistiller(policy, LoraSpec(rank=2, alpha=4.0))
    try:
        batch = RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], [0.0] * len(prompts))
        bad = [torch.zeros(len(r)) for r in responses]
        bad[1] = bad[1][:-1]
        with pytest.raises(UserError, match="sample 1"):
            distiller.step(batch, bad, [SCHEDULE] * len(prompts))
    finally:
        distiller.adapter.remove()


def _run_worker(model_dir, out, tp: int, pp: int, dp: int = 1, resume_from: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    worker = Path(__file__).with_name("distill_worker.py")
    args = [str(worker), "--model-dir", str(model_dir), "--out", str(out), "--tp", str(tp), "--pp", str(pp)]
    if resume_from is not None:
        args += ["--resume-from", str(resume_from)]
    cmd = [sys.executable, *args]
    if tp * pp * dp > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(tp * pp * dp),
            "--standalone",
            *args,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out / "result.pt")


@pytest.mark.slow
def test_tp2_pp2_dp2_distill_match_single_rank(tiny_tied, tmp_path):
    ref = _run_worker(tiny_tied, tmp_path / "tp1", 1, 1)
    assert ref["metrics"][0]["tis_clipped_frac"] >= 0 and ref["metrics"][1]["grad_norm"] > 0
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(ref["after"], ref["sparse0"], strict=True))
    for tp, pp, dp in [(2, 1, 1), (1, 2, 1), (1, 1, 2)]:
        got = _run_worker(tiny_tied, tmp_path / f"tp{tp}pp{pp}dp{dp}", tp, pp, dp)
        for key in ("sparse0", "after"):
            for a, b in zip(got[key], ref[key], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for m, r in zip(got["metrics"], ref["metrics"], strict=True):
            assert m["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-7)
            assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
        assert set(got["peft"]) == set(ref["peft"])
        # TP=2 runs sequence parallel by default: its reduce-scatter sums in another order, and two Adam
        # steps scale that fp32 noise up to ~2e-6 on adapter weights of magnitude up to 0.07.
        for name, t in got["peft"].items():
            torch.testing.assert_close(t, ref["peft"][name], rtol=1e-4, atol=5e-6, msg=name)


def _assert_same_second_step(got: dict, want: dict, exact: bool) -> None:
    close = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-6}
    for key in ("after",):
        for a, b in zip(got[key], want[key], strict=True):
            torch.testing.assert_close(a, b, **close)
    for name in ("loss", "grad_norm", "kl"):
        assert got["metrics"][1][name] == pytest.approx(
            want["metrics"][1][name], rel=close["rtol"], abs=1e-12
        )
    assert set(got["peft"]) == set(want["peft"])
    for name, t in got["peft"].items():
        torch.testing.assert_close(t, want["peft"][name], **close, msg=name)


@pytest.mark.slow
def test_distill_state_resumes_under_another_layout(tiny_tied, tmp_path):
    """The adapter and its AdamW moments saved after step 1 under TP=2 or PP=2 resume in one process
    (and one-process state in one process, bit-exact): step 2 and the exported adapter are the saved
    run's."""
    one = _run_worker(tiny_tied, tmp_path / "one", 1, 1)
    again = _run_worker(tiny_tied, tmp_path / "one-resumed", 1, 1, resume_from=tmp_path / "one" / "ckpt")
    _assert_same_second_step(again, one, exact=True)
    for tp, pp in [(2, 1), (1, 2)]:
        split = _run_worker(tiny_tied, tmp_path / f"tp{tp}pp{pp}", tp, pp)
        resumed = _run_worker(
            tiny_tied, tmp_path / f"from-tp{tp}pp{pp}", 1, 1, resume_from=tmp_path / f"tp{tp}pp{pp}" / "ckpt"
        )
        _assert_same_second_step(resumed, split, exact=False)


def test_a_foreign_or_corrupt_distill_state_is_refused(setup, tmp_path):
    policy, prompts, responses = setup
    saved = SparseDistiller(policy, LoraSpec(rank=4, alpha=8.0, seed=1))
    try:
        saved.save(tmp_path / "ok")
    finally:
        saved.adapter.remove()
    other_rank = SparseDistiller(policy, LoraSpec(rank=2, alpha=8.0, seed=1))
    try:
        with pytest.raises(
            UserError, match=r"adapter_state.pt: adapter tensor 0\.self_attention.*another LoRA rank"
        ):
            other_rank.load(tmp_path / "ok")
        with pytest.raises(UserError, match="missing"):
            other_rank.load(tmp_path / "nothing-here")
        state = tmp_path / "ok" / "adapter_state.pt"
        state.write_bytes(state.read_bytes()[:200])
        with pytest.raises(UserError, match="cannot read the DistillSparse state"):
            other_rank.load(tmp_path / "ok")
    finally:
        other_rank.adapter.remove()
