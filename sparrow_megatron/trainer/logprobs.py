"""Exact log-probs, entropy and top-K from vocab-parallel logits (each TP rank holds a vocab slice).

Written out rather than using `vocab_parallel_cross_entropy` because that one overwrites its fp32 input
in place and gives no entropy or top-K; the fused variant casts gradients to bf16. Reductions over the
vocab go through Megatron's autograd-aware TP all-reduce so gradients are exact under TP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _tp():
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_group(),
    )


def _tp_sum(x: torch.Tensor) -> torch.Tensor:
    """All-reduce sum over TP with identity backward (the loss is replicated across TP ranks)."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    tp, _, _ = _tp()
    return x if tp == 1 else reduce_from_tensor_model_parallel_region(x)


@dataclass
class TokenStats:
    logprobs: torch.Tensor  # [..., ] log p(target) under temperature
    entropy: torch.Tensor  # [..., ]


def vocab_parallel_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> TokenStats:
    """log p(target) and entropy for logits [..., V/tp] sharded over the vocab; differentiable."""
    tp, rank, group = _tp()
    z = logits.float() / temperature
    vocab_local = z.shape[-1]
    start = rank * vocab_local
    # Max for stability: no gradient needed (logsumexp is invariant to it).
    zmax = z.detach().max(dim=-1).values
    if tp > 1:
        torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = z - zmax.unsqueeze(-1)
    sum_exp = _tp_sum(shifted.exp().sum(dim=-1))
    lse = sum_exp.log()
    local_t = targets - start
    in_range = (local_t >= 0) & (local_t < vocab_local)
    picked = shifted.gather(-1, local_t.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    target_z = _tp_sum(torch.where(in_range, picked, torch.zeros_like(picked)))
    logprobs = target_z - lse
    if not with_entropy:
        return TokenStats(logprobs, torch.zeros_like(logprobs))
    probs = (shifted - lse.unsqueeze(-1)).exp()
    entropy = lse - _tp_sum((probs * shifted).sum(dim=-1))
    return TokenStats(logprobs, entropy)


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """Global top-k (ids, log-probs) over a vocab-sharded last dim, sorted by log-prob (descending)."""
    tp, rank, group = _tp()
    z = logits.float() / temperature
    vocab_local = z.shape[-1]
    zmax = z.max(dim=-1).values
    if tp > 1:
        torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = z - zmax.unsqueeze(-1)
    lse = shifted.exp().sum(dim=-1)
    if tp > 1:
        torch.distributed.all_reduce(lse, group=group)
    lse = lse.log()
    k_local = min(k, vocab_local)
    vals, ids = torch.topk(shifted, k_local, dim=-1, sorted=True)
    ids = ids + rank * vocab_local
    if tp > 1:
        all_vals = [torch.empty_like(vals) for _ in range(tp)]
        all_ids = [torch.empty_like(ids) for _ in range(tp)]
        torch.distributed.all_gather(all_vals, vals.contiguous(), group=group)
        torch.distributed.all_gather(all_ids, ids.contiguous(), group=group)
        vals, ids = torch.cat(all_vals, dim=-1), torch.cat(all_ids, dim=-1)
    # Merge the per-rank candidates: order by id first so equal values across ranks keep id order.
    order_by_id = ids.argsort(dim=-1, stable=True)
    vals, ids = vals.gather(-1, order_by_id), ids.gather(-1, order_by_id)
    order = vals.argsort(dim=-1, descending=True, stable=True)[..., : min(k, vals.shape[-1])]
    return ids.gather(-1, order), vals.gather(-1, order) - lse.unsqueeze(-1)
