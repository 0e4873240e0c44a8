import math

import pytest
import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer.grpo import (
    GRPOCoefs,
    group_advantages,
    grpo_token_loss,
    tis_weights,
    token_weights,
)


def test_group_advantages_normalise_within_each_group():
    adv = group_advantages([1.0, 0.0, 1.0, 5.0, 5.0], ["a", "a", "a", "b", "b"], eps=0.0)
    mean, std = 2 / 3, math.sqrt(2 / 9)
    expected = [(1 - mean) / std, (0 - mean) / std, (1 - mean) / std]
    assert adv[:3].tolist() == pytest.approx(expected, rel=1e-6)
    assert adv[3:].tolist() == [0.0, 0.0]  # equal rewards carry no signal


def test_group_advantages_rejects_bad_rewards():
    with pytest.raises(UserError, match="sample 1"):
        group_advantages([1.0, float("nan")], [0, 0])
    with pytest.raises(UserError, match="group ids"):
        group_advantages([1.0, 2.0], [0])


def test_tis_weights_and_clip_fractions_match_hand_computation():
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0, -2.0])
    rollout = torch.tensor([-1.0, -2.0, -0.5, -1.0, -2.0])
    # ratio = exp(logp - old): 1.0, 1.5 (above 1 + 0.28), 0.7 (below 1 - 0.2), 5.0 (dual clip), 1.1
    logp = old + torch.log(torch.tensor([1.0, 1.5, 0.7, 5.0, 1.1]))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -2.0])
    coefs = GRPOCoefs(eps_low=0.2, eps_high=0.28, dual_clip=3.0, tis_cap=2.0)
    loss, st = grpo_token_loss(logp, old, rollout, adv, coefs)

    # TIS: exp(old - rollout) = 1, e (capped at 2), exp(-0.5), 1, 1
    tis = [1.0, 2.0, math.exp(-0.5), 1.0, 1.0]
    assert st["tis_weight"].tolist() == pytest.approx(tis, rel=1e-6)
    assert st["tis_clipped"].tolist() == [0, 1, 0, 0, 0]
    assert torch.equal(tis_weights(old, rollout, 2.0), st["tis_weight"])
    # PPO term per token by hand:
    #  t0: -1*1 = -1;  t1: A>0, ratio 1.5 clipped to 1.28 -> -1.28 (clip active)
    #  t2: A>0, ratio 0.7 -> min(0.7, 0.8) = 0.7 -> -0.7 (unclipped branch, not active)
    #  t3: A<0, ratio 5 -> max(5, 1.28) = 5 -> dual clip bound 3 -> 3 (dual active, ppo clip inactive)
    #  t4: A=-2, ratio 1.1 -> 2.2 (inside the band)
    pg = [-1.0, -1.28, -0.7, 3.0, 2.2]
    assert loss.tolist() == pytest.approx([p * w for p, w in zip(pg, tis, strict=True)], rel=1e-6)
    assert st["clip_frac"].tolist() == [0, 1, 0, 0, 0]
    assert st["dual_clip_frac"].tolist() == [0, 0, 0, 1, 0]


def test_clipped_tokens_have_no_gradient_and_tis_has_none():
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 1.0, 5.0])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0])
    rollout = torch.tensor([-0.1, 0.2, 0.0])
    loss, _ = grpo_token_loss(logp, old, rollout, adv, GRPOCoefs())
    loss.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[2] == 0  # clipped and dual-clipped
    assert logp.grad[1] == pytest.approx(-math.exp(-0.2))  # -A * ratio * TIS weight


def test_k3_kl_needs_reference_and_is_nonnegative():
    logp = torch.tensor([-1.0, -2.0])
    with pytest.raises(UserError, match="ref_logprobs"):
        grpo_token_loss(logp, logp, logp, torch.ones(2), GRPOCoefs(kl_coef=0.1))
    ref = torch.tensor([-1.5, -1.0])
    loss, st = grpo_token_loss(logp, logp, logp, torch.zeros(2), GRPOCoefs(kl_coef=0.1), ref)
    d = ref - logp
    assert st["kl"].tolist() == pytest.approx((torch.exp(d) - d - 1).tolist())
    assert loss.tolist() == pytest.approx((0.1 * st["kl"]).tolist())


def test_token_weights_aggregations():
    w = token_weights([2, 4], "token-mean", global_tokens=6, global_seqs=2)
    assert [x.tolist() for x in w] == [[1 / 6] * 2, [1 / 6] * 4]
    w = token_weights([2, 4], "seq-mean-token-mean", global_tokens=6, global_seqs=2)
    assert [x.tolist() for x in w] == [[1 / 4] * 2, [1 / 8] * 4]
    assert sum(float(x.sum()) for x in w) == pytest.approx(1.0)
