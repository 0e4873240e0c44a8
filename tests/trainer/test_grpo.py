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


@pytest.mark.parametrize("std, var", [("biased", 2 / 9), ("unbiased", 1 / 3)])
def test_group_advantages_normalise_within_each_group(std, var):
    # Group a: rewards 1, 0, 1, mean 2/3, squared deviations sum 2/9 + 4/9 + 1/9 = 2/3: variance 2/9
    # dividing by n = 3 (biased), 1/3 dividing by n - 1 = 2 (unbiased, torch.std's and the reference's).
    adv = group_advantages([1.0, 0.0, 1.0, 5.0, 5.0, 7.0], ["a", "a", "a", "b", "b", "c"], eps=0.0, std=std)
    mean, std = 2 / 3, math.sqrt(var)
    expected = [(1 - mean) / std, (0 - mean) / std, (1 - mean) / std]
    assert adv[:3].tolist() == pytest.approx(expected, rel=1e-6)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # equal rewards, or a lone sample, carry no signal


def test_the_default_group_std_is_unbiased():
    assert group_advantages([1.0, 0.0], [0, 0], eps=0.0).tolist() == pytest.approx(
        [math.sqrt(0.5), -math.sqrt(0.5)]
    )


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


def test_clip_sides_and_approx_kl_match_hand_computation():
    old = torch.zeros(5)
    ratios = torch.tensor([1.5, 0.7, 1.5, 0.7, 1.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    _, st = grpo_token_loss(ratios.log(), old, old, adv, GRPOCoefs(eps_low=0.2, eps_high=0.28))
    # The band cuts only where it lowers the objective: ratio above 1.28 with A > 0 (high side), ratio
    # below 0.8 with A < 0 (low side); 1.5 with A < 0 and 0.7 with A > 0 keep their gradient.
    assert st["clip_frac_high"].tolist() == [1, 0, 0, 0, 0]
    assert st["clip_frac_low"].tolist() == [0, 1, 0, 0, 0]
    assert st["clip_frac"].tolist() == [1, 1, 0, 0, 0]
    kl = [r - 1 - math.log(r) for r in ratios.tolist()]  # k3 of KL(old || new), 0 at ratio 1
    assert st["approx_kl"].tolist() == pytest.approx(kl, rel=1e-5, abs=1e-7)


def test_clipped_tokens_have_no_gradient_and_tis_has_none():
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 1.0, 5.0])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0])
    rollout = torch.tensor([-0.1, 0.2, 0.0])
    loss, _ = grpo_token_loss(logp, old, rollout, adv, GRPOCoefs())
    loss.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[2] == 0  # clipped and dual-clipped
    assert logp.grad[1] == pytest.approx(-math.exp(-0.2))  # -A * ratio * TIS weight


def test_no_tis_cap_means_weight_one():
    old, rollout = torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0])
    assert tis_weights(old, rollout, None).tolist() == [1.0, 1.0]
    loss, st = grpo_token_loss(old.clone(), old, rollout, torch.ones(2), GRPOCoefs(tis_cap=None))
    assert loss.tolist() == [-1.0, -1.0] and st["tis_clipped"].tolist() == [0.0, 0.0]


def test_clamps_keep_loss_and_grads_finite_on_overflowing_inputs():
    # Log-ratios of +-100 and +-inf: exp() alone overflows float32 (e^100 = inf), and inf reaching the
    # unselected branch of the clip makes 0 * inf = NaN in the backward pass. The clamp (+-20 on every
    # log-ratio, +-10 on the k3 term) keeps both finite, as in the reference.
    inf = float("inf")
    old = torch.tensor([0.0, 0.0, -inf, 0.0, 0.0, -1.0])
    logp = torch.tensor([100.0, -100.0, -1.0, 100.0, -100.0, -1.0], requires_grad=True)
    rollout = torch.tensor([-200.0, 0.0, 0.0, -inf, 0.0, -1.0])
    ref = torch.tensor([-200.0, 100.0, -1.0, 0.0, inf, -1.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])
    loss, st = grpo_token_loss(logp, old, rollout, adv, GRPOCoefs(tis_cap=3.0, kl_coef=0.1), ref)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert (st["ratio"] <= math.exp(20.0) * (1 + 1e-6)).all() and (
        st["ratio"] >= math.exp(-20.0) * (1 - 1e-6)
    ).all()
    assert (st["kl"] <= 10.0).all() and (st["kl"] >= 0.0).all()
    assert st["kl"][0] == 10.0  # d = -300 clamps to -20: e^-20 + 20 - 1 ~ 19 -> bound 10
    assert st["kl"][-1] == 0.0  # an ordinary token is untouched
    assert (st["tis_weight"] <= 3.0).all()
    # Beyond the clamp the ratio is constant, so the token gives no gradient (as any clipped token).
    assert logp.grad[0] == 0.0 and logp.grad[2] == pytest.approx(0.0)
    # Without the clamp the same input gives a NaN gradient (the clamp is what prevents it).
    raw = torch.tensor([100.0], requires_grad=True)
    torch.maximum(-torch.exp(raw), -torch.exp(raw).clamp(0.8, 1.28)).sum().backward()
    assert torch.isnan(raw.grad).all()


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
