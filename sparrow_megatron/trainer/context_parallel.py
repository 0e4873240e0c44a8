"""Context parallelism's data split: each packed sequence over the CP ranks, the way Megatron-Core and
Transformer Engine expect it for causal attention, and the per-token results brought back together.

Causal attention costs more for late positions, so a sequence cut into cp contiguous pieces would load
the last rank most. Instead each sequence (padded to a multiple of 2 * cp) is cut into 2 * cp equal
chunks and rank r holds chunks r and 2 * cp - 1 - r: every rank gets one early and one late chunk (TE's
`thd_get_partitioned_indices` layout, which its THD attention assumes). `PackedSeqParams` then carries
the true lengths (cu_seqlens) and the padded ones (cu_seqlens_padded), both global.

A response token is scored at the position before it, so it belongs to the rank holding that position;
each rank computes the statistics of its own tokens (`target_subset` on the local MicroBatch) and
`merge_token_parts` puts a sample's tokens back in order.
"""

from __future__ import annotations

import dataclasses

import torch

from sparrow_megatron.trainer.batch import MicroBatch


def sequence_multiple(cp: int, tp: int, sequence_parallel: bool) -> int:
    """Each packed sequence's length is padded to a multiple of this: 2 * cp chunks, and under sequence
    parallelism every rank's local share (2 chunks per sequence) must also split over the TP ranks."""
    return 2 * cp * (tp if sequence_parallel else 1)


def rank_positions(cu_seqlens_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """The global positions CP rank `rank` holds, in its local order: per sequence, chunk `rank` then
    chunk 2 * cp - 1 - rank (each of padded length / (2 * cp)). One arange per sequence, no per-token loop."""
    bounds = cu_seqlens_padded.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        if length % (2 * cp):
            raise ValueError(
                f"a packed sequence of padded length {length} does not split into {2 * cp} chunks"
            )
        chunk = length // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def split_for_rank(x: torch.Tensor, cu_seqlens_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """x [..., total] (the packed sequence dim last) -> this rank's [..., total / cp]."""
    return x[..., rank_positions(cu_seqlens_padded, cp, rank).to(x.device)]


def unsplit(parts: list[torch.Tensor], cu_seqlens_padded: torch.Tensor, cp: int) -> torch.Tensor:
    """The inverse: every rank's [..., total / cp] (rank order) -> [..., total]."""
    total = int(cu_seqlens_padded[-1])
    out = parts[0].new_empty(*parts[0].shape[:-1], total)
    for rank, part in enumerate(parts):
        out[..., rank_positions(cu_seqlens_padded, cp, rank).to(part.device)] = part
    return out


def local_micro_batch(mb: MicroBatch, cp: int, rank: int) -> MicroBatch:
    """CP rank `rank`'s view of a packed micro-batch: its tokens and positions, and of each sample the
    response tokens scored there (target_positions in local indices, target_subset the tokens' indices
    in the sample's response)."""
    if not mb.packed or mb.cu_seqlens_padded is None:
        raise ValueError("context parallelism splits packed (THD) micro-batches with padded cu_seqlens")
    keep = rank_positions(mb.cu_seqlens_padded, cp, rank)
    local_of = torch.full((mb.seq_len,), -1, dtype=torch.long)
    local_of[keep] = torch.arange(len(keep))
    positions, targets, subsets = [], [], []
    for pos, tgt in zip(mb.target_positions, mb.targets, strict=True):
        local = local_of[pos]
        here = (local >= 0).nonzero().flatten()
        positions.append(local[here])
        targets.append(tgt[here])
        subsets.append(here)
    return dataclasses.replace(
        mb,
        tokens=mb.tokens[:, keep],
        position_ids=mb.position_ids[:, keep],
        target_positions=positions,
        targets=targets,
        target_subset=subsets,
    )


def merge_token_parts(lengths: dict[int, int], parts) -> dict[int, torch.Tensor]:
    """parts: (sample id, token indices or slice(None) for all, values) from every rank -> per sample its
    values in token order.

    Every token of a sample must come from exactly one part (the CP ranks partition them)."""
    out: dict[int, torch.Tensor] = {}
    seen: dict[int, int] = {}
    for sid, index, values in parts:
        if sid not in out:
            out[sid] = values.new_empty(lengths[sid], *values.shape[1:])
            seen[sid] = 0
        out[sid][index] = values
        seen[sid] += len(values)
    for sid, n in seen.items():
        if n != lengths[sid]:
            raise RuntimeError(f"sample {sid}: {n} of {lengths[sid]} tokens came back from the CP ranks")
    return out
