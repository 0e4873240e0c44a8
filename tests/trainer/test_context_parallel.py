"""Context parallelism's data split on CPU: pure tensor functions (the attention itself needs TE)."""

import pytest
import torch

from sparrow_megatron.trainer import RolloutBatch
from sparrow_megatron.trainer.batch import build_micro_batch
from sparrow_megatron.trainer.context_parallel import (
    local_micro_batch,
    merge_token_parts,
    rank_positions,
    sequence_multiple,
    split_for_rank,
    unsplit,
)


def test_each_sequence_is_cut_in_2cp_chunks_rank_r_taking_r_and_2cp_1_r():
    cu = torch.tensor([0, 8, 24])  # padded lengths 8 and 16, cp = 2: chunks of 2 and 4
    assert rank_positions(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23]
    assert rank_positions(cu, 2, 1).tolist() == [2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="does not split into 4 chunks"):
        rank_positions(torch.tensor([0, 6]), 2, 0)


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_split_then_unsplit_is_the_identity(cp):
    cu = torch.tensor([0, 6 * cp, 10 * cp, 12 * cp])
    x = torch.randn(2, int(cu[-1]))
    parts = [split_for_rank(x, cu, cp, r) for r in range(cp)]
    assert all(p.shape == (2, int(cu[-1]) // cp) for p in parts)  # every rank holds the same share
    torch.testing.assert_close(unsplit(parts, cu, cp), x, rtol=0, atol=0)
    # the ranks partition the positions
    assert sorted(torch.cat([rank_positions(cu, cp, r) for r in range(cp)]).tolist()) == list(
        range(int(cu[-1]))
    )


def test_sequence_multiple_covers_sequence_parallelism():
    assert sequence_multiple(2, 4, sequence_parallel=False) == 4
    assert sequence_multiple(2, 4, sequence_parallel=True) == 16  # each rank's share splits over TP


def _batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (3, 5, 2)]
    responses = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (6, 9, 4)]
    return RolloutBatch(prompts, responses)


def test_padded_pack_keeps_true_and_padded_bounds():
    batch = _batch()
    mb = build_micro_batch(batch, [0, 1, 2], packed=True, seq_multiple=4)
    assert mb.cu_seqlens.tolist() == [0, 9, 23, 29]  # true lengths 9, 14, 6
    assert mb.cu_seqlens_padded.tolist() == [0, 12, 28, 36]  # each padded to a multiple of 4
    assert mb.position_ids[0, 12:14].tolist() == [0, 1]  # positions restart per sample
    seq = batch.prompt_ids[1] + batch.response_ids[1]
    assert mb.tokens[0, 12 : 12 + len(seq)].tolist() == seq and mb.tokens[0, 26:28].tolist() == [0, 0]


@pytest.mark.parametrize("cp", [2, 3])
def test_local_views_score_every_token_once_and_merge_back(cp):
    batch = _batch()
    mb = build_micro_batch(batch, [0, 1, 2], packed=True, seq_multiple=2 * cp)
    # a stand-in for per-position model output: the global position itself
    full = torch.arange(mb.seq_len, dtype=torch.float32)
    parts = []
    for r in range(cp):
        local = local_micro_batch(mb, cp, r)
        assert local.tokens.shape[1] == mb.seq_len // cp
        torch.testing.assert_close(local.tokens[0], split_for_rank(mb.tokens[0], mb.cu_seqlens_padded, cp, r))
        out = split_for_rank(full, mb.cu_seqlens_padded, cp, r)
        for j, sid in enumerate(local.sample_ids):
            # the local logit position holds the same global position the unsplit batch scores there
            want = mb.target_positions[j][local.target_subset[j]]
            assert out[local.target_positions[j]].tolist() == want.float().tolist()
            want_tokens = mb.targets[j][local.target_subset[j]]
            assert torch.equal(local.targets[j], want_tokens)
            parts.append((sid, local.target_subset[j], out[local.target_positions[j]]))
    lengths = {i: len(r) for i, r in enumerate(batch.response_ids)}
    merged = merge_token_parts(lengths, parts)
    for j in range(len(batch)):
        assert merged[j].tolist() == mb.target_positions[j].float().tolist()
    drop = next(i for i, part in enumerate(parts) if len(part[1]))
    with pytest.raises(RuntimeError, match="tokens came back"):
        merge_token_parts(lengths, parts[:drop] + parts[drop + 1 :])
