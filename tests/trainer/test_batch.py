import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer.batch import RolloutBatch, build_micro_batch, pack_micro_batches


def _padded(lengths, ids):
    return max(lengths[i] for i in ids) * len(ids)


@pytest.mark.parametrize("budget", [16, 40, 100])
def test_packing_covers_every_sample_once_within_budget(budget):
    lengths = [12, 3, 7, 9, 16, 2, 5, 5, 11]
    packs = pack_micro_batches(lengths, budget)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(_padded(lengths, p) <= budget for p in packs)


def test_packing_pads_to_a_requested_count_and_isolates_long_samples():
    lengths = [50, 3, 4]
    packs = pack_micro_batches(lengths, token_budget=10)
    assert [50] in [[lengths[i] for i in p] for p in packs]  # longer than the budget: alone
    packs = pack_micro_batches([3, 4], token_budget=100, min_count=3)
    assert len(packs) == 3 and sorted(i for p in packs for i in p) == [0, 1]


def test_micro_batch_targets_align_with_next_token_positions():
    batch = RolloutBatch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]])
    mb = build_micro_batch(batch, [0, 1])
    assert mb.tokens.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert mb.target_positions[0].tolist() == [2, 3] and mb.targets[0].tolist() == [5, 6]
    assert mb.target_positions[1].tolist() == [0, 1, 2] and mb.targets[1].tolist() == [7, 8, 9]


def test_batch_validation_names_the_sample_and_field():
    batch = RolloutBatch([[1], [2]], [[3], [4, 5]], rollout_logprobs=[[-1.0], [-1.0]], advantages=[1.0, 0.0])
    with pytest.raises(UserError, match="sample 1 has 2 response tokens but 1 rollout_logprobs"):
        batch.validate(vocab_size=128, need_training_fields=True)
    batch.rollout_logprobs[1] = [-1.0, float("nan")]
    with pytest.raises(UserError, match="sample 1 field 'rollout_logprobs' token 1"):
        batch.validate(vocab_size=128, need_training_fields=True)
    with pytest.raises(UserError, match="sample 0 field 'prompt_ids'"):
        RolloutBatch([[500]], [[1]]).validate(vocab_size=128, need_training_fields=False)
