import pytest
import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer.batch import (
    RolloutBatch,
    balanced_shards,
    build_micro_batch,
    micro_batch_cost,
    pack_micro_batches,
    split_mini_batches,
)


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


def test_dp_shards_balance_tokens_not_sample_counts():
    # Round-robin would give rank 0 both long responses (37K + 30K) and rank 1 the short ones.
    lengths = [37_000, 2_000, 30_000, 1_500, 3_000, 2_500, 2_000, 1_000]
    shards = balanced_shards(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in s) for s in shards]
    assert max(totals) - min(totals) <= 7_000  # LPT: within the smallest item's reach here
    assert {0, 2} not in [set(s) & {0, 2} for s in shards]  # the two long ones on different ranks
    assert balanced_shards(lengths, 2) == shards  # deterministic: every rank computes the same split
    assert balanced_shards([5, 5], 4)[2:] == [[], []]  # more ranks than samples: empty shards


def test_packed_micro_batches_fit_the_token_sum_and_count_can_be_forced():
    lengths = [12, 3, 7, 9, 16, 2, 5, 5, 11]
    packs = pack_micro_batches(lengths, 20, packed=True)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(micro_batch_cost(lengths, p, packed=True) <= 20 for p in packs)
    # Packed costs the token sum, padded rows x longest: packing needs no more micro-batches.
    assert len(packs) <= len(pack_micro_batches(lengths, 20))
    assert len(pack_micro_batches(lengths, 20, min_count=8, packed=True)) == 8


def test_packed_micro_batch_has_no_padding_between_samples():
    batch = RolloutBatch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]])
    mb = build_micro_batch(batch, [0, 1], packed=True, pad_to=4)
    # [1 2 3 5 6 | 4 7 8 9 | pad pad pad]: 9 tokens rounded up to 12, the pad is its own segment.
    assert mb.tokens.tolist() == [[1, 2, 3, 5, 6, 4, 7, 8, 9, 0, 0, 0]]
    assert mb.cu_seqlens.tolist() == [0, 5, 9, 12] and mb.cu_seqlens.dtype == torch.int32
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert mb.max_seqlen == 5
    assert mb.flat_target_index().tolist() == [2, 3, 5, 6, 7]
    assert torch.cat(mb.targets).tolist() == [5, 6, 7, 8, 9]
    padded = build_micro_batch(batch, [0, 1])  # rows of 5: sample 1 starts at flat index 5
    assert padded.flat_target_index().tolist() == [2, 3, 5, 6, 7]
    empty = build_micro_batch(batch, [], packed=True, pad_to=2)
    assert empty.cu_seqlens.tolist() == [0, 2] and empty.flat_target_index().numel() == 0


def test_mini_batches_keep_groups_whole_and_split_them_evenly():
    groups = ["a", "a", "b", "c", "b", "c", "d", "d", "e", "e"]
    parts = split_mini_batches(groups, 2)
    assert parts == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]  # groups a, b, c then d, e
    assert split_mini_batches(groups, 1) == [list(range(10))]
    # More mini-batches than groups: one group each, never a split group.
    assert split_mini_batches([0, 0, 1, 1], 3) == [[0, 1], [2, 3]]


def test_subset_carries_every_per_sample_field():
    b = RolloutBatch([[1], [2], [3]], [[4], [5, 6], [7]], [[-1.0], [-1.0, -2.0], [-3.0]], [0.1, 0.2, 0.3],
                     response_masks=[[1], [1, 0], [1]], old_logprobs=[torch.zeros(1), torch.ones(2),
                     torch.zeros(1)], group_ids=[0, 1, 1])  # fmt: skip
    s = b.subset([2, 1])
    assert s.prompt_ids == [[3], [2]] and s.advantages == [0.3, 0.2] and s.group_ids == [1, 1]
    assert s.response_masks == [[1], [1, 0]] and torch.equal(s.old_logprobs[1], torch.ones(2))
    assert s.ref_logprobs is None and s.rollout_logprobs == [[-3.0], [-1.0, -2.0]]
