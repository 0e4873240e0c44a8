"""Policy: HF logits parity, scoring, GRPO steps, and TP/PP parity under torchrun (gloo, 2 ranks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparrow_megatron.trainer import RolloutBatch, group_advantages
from sparrow_megatron.trainer.policy import _causal_mask
from tests.trainer.policy_args import make_policy

WORKER = Path(__file__).with_name("parallel_worker.py")


def _hf_model(model_dir):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.mark.parametrize("which", ["tiny_tied", "tiny_untied"])
def test_mcore_logits_and_scores_match_hf_transformers(which, request):
    model_dir = request.getfixturevalue(which)
    policy = make_policy(str(model_dir), temperature=0.7, top_k_logprobs=5)
    hf = _hf_model(model_dir)
    tokens = torch.tensor([[5, 17, 33, 2, 90, 64, 11, 7, 100, 3]])
    with torch.no_grad():
        ref_logits = hf(tokens).logits
        policy.model.eval()
        logits = policy.model(tokens, torch.arange(10)[None], _causal_mask(10, tokens.device))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)

    batch = RolloutBatch([[5, 17, 33], [2, 90]], [[2, 90, 64, 11], [7]])
    scored = policy.score(batch)
    for i in range(2):
        seq = torch.tensor([batch.prompt_ids[i] + batch.response_ids[i]])
        p, r = len(batch.prompt_ids[i]), len(batch.response_ids[i])
        with torch.no_grad():
            logp = (hf(seq).logits[0, p - 1 : p + r - 1] / 0.7).log_softmax(-1)
        target = torch.tensor(batch.response_ids[i])
        torch.testing.assert_close(
            scored.logprobs[i], logp.gather(-1, target[:, None])[:, 0], rtol=1e-5, atol=1e-6
        )
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(scored.entropy[i], entropy, rtol=1e-5, atol=1e-6)
        top_lp, top_ids = logp.topk(5, dim=-1)
        assert torch.equal(scored.topk_ids[i], top_ids)
        torch.testing.assert_close(scored.topk_logprobs[i], top_lp, rtol=1e-5, atol=1e-6)


def test_grpo_steps_move_logprobs_in_the_advantage_direction(tiny_tied):
    policy = make_policy(str(tiny_tied), lr=3e-4, micro_batch_tokens=16, seed=3)
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
    responses = [[20, 21, 22, 23], [40, 41, 42], [60, 61], [80, 81, 82, 83, 84]]
    adv = group_advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1]).tolist()
    assert adv[0] > 0 > adv[1] and adv[3] > 0 > adv[2]

    def mean_logps():
        s = policy.score(RolloutBatch(prompts, responses), top_k=0)
        return [float(x.mean()) for x in s.logprobs]

    before = mean_logps()
    for _ in range(3):
        # On-policy rollout: the engine's log-probs equal the dense ones, TIS weights are 1.
        rollout = [x.tolist() for x in policy.score(RolloutBatch(prompts, responses), top_k=0).logprobs]
        metrics = policy.train_step(RolloutBatch(prompts, responses, rollout, adv))
        assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["grad_norm"] > 0 and metrics["num_micro_batches"] >= 2
    after = mean_logps()
    for i, a in enumerate(adv):
        assert (after[i] - before[i]) * a > 0, (i, before[i], after[i], a)
    assert policy.step == 3


def _grouped_batch(policy):
    """Four GRPO groups of two samples; on-policy rollout log-probs."""
    g = torch.Generator().manual_seed(0)
    prompts = [[5 + i, 6, 7] for i in range(4) for _ in range(2)]
    responses = [torch.randint(5, 120, (6,), generator=g).tolist() for _ in range(8)]
    groups = [i // 2 for i in range(8)]
    adv = group_advantages([1.0, 0.0] * 4, groups).tolist()
    roll = [x.tolist() for x in policy.score(RolloutBatch(prompts, responses), top_k=0).logprobs]
    return RolloutBatch(prompts, responses, roll, adv, group_ids=groups)


def test_mini_batches_update_the_policy_between_them_and_the_clip_acts(tiny_tied):
    one = make_policy(str(tiny_tied), lr=1e-3, micro_batch_tokens=16, seed=3)
    m1 = one.train_step(_grouped_batch(one))
    # One mini-batch: the ratio is exactly on-policy, nothing to clip.
    assert m1["num_mini_batches"] == 1 and m1["clip_frac"] == 0 and m1["approx_kl"] < 1e-9

    policy = make_policy(str(tiny_tied), lr=1e-3, micro_batch_tokens=16, seed=3, mini_batches=4)
    m = policy.train_step(_grouped_batch(policy))
    per = policy.mini_batch_metrics
    assert m["num_mini_batches"] == 4 and len(per) == 4 and policy.step == 1
    assert all(x["grad_norm"] > 0 for x in per)
    # The first mini-batch sees the policy the old log-probs came from; every later one an updated policy.
    assert per[0]["approx_kl"] < 1e-9 and per[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert all(x["approx_kl"] > 1e-4 for x in per[1:])
    # A token is clipped only when its ratio left [1 - eps_low, 1 + eps_high], and here some do.
    for x in per:
        outside = x["ratio_max"] > 1.28 or x["ratio_min"] < 0.8
        assert (x["clip_frac"] > 0) <= outside
        assert x["clip_frac"] == pytest.approx(x["clip_frac_low"] + x["clip_frac_high"])
    assert m["clip_frac"] > 0 and m["ratio_max"] == max(x["ratio_max"] for x in per)
    assert m["num_tokens"] == 48


def _run_worker(model_dir, untied_dir, out: Path, tp: int, pp: int, dp: int = 1, extra=()) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(WORKER), "--model-dir", str(model_dir), "--out", str(out), "--tp", str(tp), "--pp", str(pp)]
    args += ["--untied-model-dir", str(untied_dir)] if untied_dir else []
    args += list(extra)
    if tp * pp * dp == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp * pp * dp)]
        cmd += ["--standalone", *args]  # rendezvous on a free local port
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out / "result.pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _load_hf_dir(d: Path) -> dict:
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.slow
def test_tp2_pp2_dp2_match_single_rank_and_round_trip_hf(tiny_tied, tiny_untied, tmp_path):
    ref = _run_worker(tiny_tied, tiny_untied, tmp_path / "tp1pp1dp1", 1, 1)
    original = _load_hf_dir(tiny_tied)
    original_untied = _load_hf_dir(tiny_untied)
    assert ref["metrics"]["num_micro_batches"] >= 2 and ref["metrics"]["tis_clipped_frac"] > 0
    for tp, pp, dp in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]:
        out = tmp_path / f"tp{tp}pp{pp}dp{dp}"
        got = ref if (tp, pp, dp) == (1, 1, 1) else _run_worker(tiny_tied, tiny_untied, out, tp, pp, dp)
        for a, b in zip(got["logprobs"], ref["logprobs"], strict=True):
            assert _rel(a, b) < 1e-5
        for a, b in zip(got["entropy"], ref["entropy"], strict=True):
            assert _rel(a, b) < 1e-5
        for a, b in zip(got["topk_ids"], ref["topk_ids"], strict=True):
            assert torch.equal(a, b)
        assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-4)
        assert got["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"], rel=1e-4)
        assert set(got["grads"]) == set(original)
        for name, g in got["grads"].items():
            assert _rel(g, ref["grads"][name]) < 1e-4, name
        # HF -> mcore (this split) -> HF is bit-exact, tied (single file) and untied (sharded + index).
        exported = _load_hf_dir(out / "hf_export")
        assert set(exported) == set(original)
        assert all(torch.equal(exported[k], original[k]) for k in original)
        assert (out / "hf_export_untied" / "model.safetensors.index.json").is_file()
        exported = _load_hf_dir(out / "hf_export_untied")
        assert set(exported) == set(original_untied) and "lm_head.weight" in exported
        assert all(torch.equal(exported[k], original_untied[k]) for k in original_untied)


@pytest.mark.slow
def test_mini_batches_under_tp2_match_single_rank(tiny_tied, tmp_path):
    extra = ["--mini-batches", "2", "--lr", "1e-2"]
    ref = _run_worker(tiny_tied, None, tmp_path / "tp1", 1, 1, extra=extra)
    got = _run_worker(tiny_tied, None, tmp_path / "tp2", 2, 1, extra=extra)
    assert ref["metrics"]["num_mini_batches"] == 2
    assert ref["mini_batch_metrics"][1]["approx_kl"] > 1e-4  # the second mini-batch saw updated weights
    for a, b in zip(got["mini_batch_metrics"], ref["mini_batch_metrics"], strict=True):
        for k in ("loss", "approx_kl", "ratio_max", "ratio_min", "clip_frac", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6), k


@pytest.mark.parametrize("pack", [True, False])
def test_forwards_pass_no_mask_tensor_and_packs_without_padding(tiny_tied, monkeypatch, pack):
    from sparrow_megatron.trainer.local_layers import SdpaCoreAttention

    seen = []
    original = SdpaCoreAttention.forward

    def spy(self, query, key, value, attention_mask, *args, **kwargs):
        seen.append((attention_mask, kwargs.get("packed_seq_params"), query.shape[0]))
        return original(self, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(SdpaCoreAttention, "forward", spy)
    policy = make_policy(str(tiny_tied), micro_batch_tokens=64, pack_sequences=pack)
    batch = RolloutBatch(
        [[5, 6, 7], [8, 9]], [[20, 21, 22, 23], [40, 41, 42]], [[-1.0] * 4, [-1.0] * 3], [1.0, -1.0]
    )
    policy.train_step(batch)  # scores old log-probs, then forward + backward
    assert seen and all(mask is None for mask, _, _ in seen)  # causal mask type, no [s, s] tensor
    if pack:
        assert all(p is not None and p.qkv_format == "thd" for _, p, _ in seen)
        assert all(p.cu_seqlens_q.tolist() == [0, 7, 12] for _, p, _ in seen)
        assert all(tokens == 12 for _, _, tokens in seen)  # 7 + 5 tokens, nothing padded
    else:
        assert all(p is None for _, p, _ in seen)
