"""grpo.overlong: truncated responses masked out of the loss, or DAPO's soft penalty on the reward."""

from types import SimpleNamespace

import pytest
import torch

from sparrow_megatron.loop import overlong
from sparrow_megatron.rollout.types import Sample
from sparrow_megatron.trainer.config import GRPOConfig
from sparrow_megatron.trainer.grpo import GRPOCoefs, grpo_token_loss


def _sample(n: int, finish: str) -> Sample:
    return Sample(0, 0, [1, 2], list(range(3, 3 + n)), [-1.0] * n, [], [], finish, 0, 0, None, None, 0.0)


def test_soft_penalty_matches_dapo_by_hand():
    # max 10 tokens, buffer 4: free up to 6, then -1/4 per token, -1 (x factor 0.5) at the cutoff.
    grpo = GRPOConfig(overlong="penalty", overlong_buffer=4, overlong_penalty=0.5)
    samples = [_sample(n, "length" if n == 10 else "stop") for n in (3, 6, 7, 9, 10)]
    shaped = overlong.shaped_rewards(grpo, 10, samples, [1.0, 1.0, 1.0, 0.0, 0.0])
    assert shaped == pytest.approx([1.0, 1.0, 1.0 - 0.125, -0.375, -0.5])
    assert overlong.loss_masks(grpo, samples) is None  # the penalty shapes rewards, it masks nothing
    m = overlong.metrics(samples, [1.0, 1.0, 1.0, 0.0, 0.0], shaped)
    assert m["rollout/truncated_frac"] == pytest.approx(0.2)
    assert m["reward/overlong_penalty"] == pytest.approx(-(0.125 + 0.375 + 0.5) / 5)


def test_a_zero_buffer_penalises_only_the_cutoff():
    assert overlong.overlong_penalty(9, 10, 0, 1.0) == 0.0
    assert overlong.overlong_penalty(10, 10, 0, 1.0) == -1.0


def test_none_and_mask_leave_rewards_alone():
    samples = [_sample(10, "length"), _sample(4, "stop")]
    for mode in ("none", "mask"):
        assert overlong.shaped_rewards(GRPOConfig(overlong=mode), 10, samples, [0.0, 1.0]) == [0.0, 1.0]
    assert overlong.loss_masks(GRPOConfig(), samples) is None


def test_mask_drops_truncated_tokens_from_the_token_mean_loss():
    from sparrow_megatron.trainer.batch import RolloutBatch
    from sparrow_megatron.trainer.policy import Policy

    grpo = GRPOConfig(overlong="mask")
    samples = [_sample(3, "stop"), _sample(4, "length"), _sample(2, "stop")]
    masks = overlong.loss_masks(grpo, samples)
    assert masks == [[1, 1, 1], [0, 0, 0, 0], [1, 1]]
    batch = RolloutBatch([s.prompt_ids for s in samples], [s.output_ids for s in samples],
                         response_masks=masks)  # fmt: skip
    # loss_masks_and_weights only reads the grpo section: the weights the trainer would use.
    _, weights = Policy.loss_masks_and_weights(SimpleNamespace(grpo=grpo), batch)
    # Ratio 1, no TIS: each token's loss is -A. Advantages 1, -1 (truncated), -0.5.
    adv = [1.0, -1.0, -0.5]
    total = 0.0
    for w, a, n in zip(weights, adv, (3, 4, 2), strict=True):
        lp = torch.zeros(n)
        loss, _ = grpo_token_loss(lp, lp, lp, torch.full((n,), a), GRPOCoefs(tis_cap=None))
        total += float((loss.double() * w).sum())
    # token-mean over the 5 kept tokens: (3 * -1 + 2 * 0.5) / 5; the truncated sample adds nothing.
    assert total == pytest.approx((3 * -1.0 + 2 * 0.5) / 5)
