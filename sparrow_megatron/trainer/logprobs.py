"""Exact log-probs, entropy and top-K from vocab-parallel logits (each TP rank holds a vocab slice).

Written out rather than using `vocab_parallel_cross_entropy` because that one overwrites its fp32 input
in place and gives no entropy or top-K; the fused variant casts gradients to bf16.

`token_stats` is what the trainer uses: it walks the scored positions in chunks of C tokens, so at most
one fp32 [C, V/tp] chunk (and its exp) is alive at a time instead of [T, V/tp] (23 GB for Qwen3-1.7B at
38K tokens, TP 1). Its backward keeps only the model's own logits and a [T] log-sum-exp and recomputes
each chunk's softmax (the approach of NeMo-RL's chunked distributed log-prob). Entropy and top-K are
computed without autograd: they are logged or stored, never differentiated.

`vocab_parallel_logprobs` / `vocab_parallel_topk` are the one-shot forms (the reference in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def _stats_of_chunk(z: torch.Tensor, targets: torch.Tensor, want_entropy: bool, top_k: int):
    """z: fp32 [C, V/tp] logits / temperature (consumed in place). Returns (lse, logprobs, entropy, topk)
    where lse is absolute (log sum exp z over the whole vocab)."""
    tp, rank, group = _tp()
    vocab_local = z.shape[-1]
    zmax = z.max(dim=-1).values
    if tp > 1:
        torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX, group=group)
    z.sub_(zmax.unsqueeze(-1))  # shifted, in place: one fp32 chunk plus its exp at a time
    local_t = targets - rank * vocab_local
    in_range = (local_t >= 0) & (local_t < vocab_local)
    picked = z.gather(-1, local_t.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    exp = z.exp()
    sums = [exp.sum(dim=-1), torch.where(in_range, picked, torch.zeros_like(picked))]
    if want_entropy:
        sums.append(exp.mul_(z).sum(dim=-1))  # in place: z and one more chunk are the peak
    sums = torch.stack(sums)
    del exp
    if tp > 1:
        torch.distributed.all_reduce(sums, group=group)  # one collective for all three sums
    log_sum = sums[0].log()
    logprobs = sums[1] - log_sum
    # H = lse - E_p[z] in the shifted frame: log(sum e^z) - sum(e^z z) / sum(e^z)
    entropy = log_sum - sums[2] / sums[0] if want_entropy else None
    topk = None
    if top_k > 0:
        topk = _merge_topk(z, top_k, rank * vocab_local, group, tp)
        topk = (topk[0], topk[1] - log_sum.unsqueeze(-1))
    return zmax + log_sum, logprobs, entropy, topk


def _merge_topk(shifted: torch.Tensor, k: int, offset: int, group, tp: int):
    vals, ids = torch.topk(shifted, min(k, shifted.shape[-1]), dim=-1, sorted=True)
    ids = ids + offset
    if tp > 1:
        all_vals = [torch.empty_like(vals) for _ in range(tp)]
        all_ids = [torch.empty_like(ids) for _ in range(tp)]
        torch.distributed.all_gather(all_vals, vals.contiguous(), group=group)
        torch.distributed.all_gather(all_ids, ids.contiguous(), group=group)
        vals, ids = torch.cat(all_vals, dim=-1), torch.cat(all_ids, dim=-1)
    order_by_id = ids.argsort(dim=-1, stable=True)  # equal values across ranks keep id order
    vals, ids = vals.gather(-1, order_by_id), ids.gather(-1, order_by_id)
    order = vals.argsort(dim=-1, descending=True, stable=True)[..., : min(k, vals.shape[-1])]
    return ids.gather(-1, order), vals.gather(-1, order)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class _ChunkedLogprob(torch.autograd.Function):
    """logits2d [N, V/tp] (the model output, any dtype), index [T] rows of it, targets [T] ->
    logprobs [T] (differentiable) and entropy [T] (not)."""

    @staticmethod
    def forward(ctx, logits2d, index, targets, temperature: float, chunk: int, want_entropy: bool):
        n = index.numel()
        lse = torch.empty(n, dtype=torch.float32, device=logits2d.device)
        logprobs = torch.empty_like(lse)
        entropy = torch.zeros_like(lse)
        for a, b in _chunks(n, chunk):
            z = logits2d.index_select(0, index[a:b]).float().div_(temperature)
            lse[a:b], logprobs[a:b], ent, _ = _stats_of_chunk(z, targets[a:b], want_entropy, 0)
            if ent is not None:
                entropy[a:b] = ent
        ctx.save_for_backward(logits2d, index, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy) -> tuple[Any, ...]:
        logits2d, index, targets, lse = ctx.saved_tensors
        _, rank, _ = _tp()
        vocab_local = logits2d.shape[-1]
        grad = torch.zeros_like(logits2d)
        for a, b in _chunks(index.numel(), ctx.chunk):
            # d logp / d z_j = 1[j = target] - p_j, and z = logits / T: this rank's vocab slice only.
            g = logits2d.index_select(0, index[a:b]).float().div_(ctx.temperature)
            g.sub_(lse[a:b].unsqueeze(-1)).exp_().mul_(-grad_logprobs[a:b].unsqueeze(-1))
            local_t = targets[a:b] - rank * vocab_local
            mine = ((local_t >= 0) & (local_t < vocab_local)).nonzero().squeeze(-1)
            g[mine, local_t[mine]] += grad_logprobs[a:b][mine]
            grad.index_add_(0, index[a:b], g.div_(ctx.temperature).to(grad.dtype))
        return grad, None, None, None, None, None


@dataclass
class ChunkedStats:
    logprobs: torch.Tensor  # [T], differentiable when the logits are
    entropy: torch.Tensor  # [T], no gradient (zeros when not asked for)
    topk_ids: torch.Tensor | None = None  # [T, K] (scoring only)
    topk_logprobs: torch.Tensor | None = None


def token_stats(
    logits: torch.Tensor,
    index: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    with_entropy: bool = True,
    top_k: int = 0,
) -> ChunkedStats:
    """Log-probs of targets at rows `index` of the flattened logits [..., V/tp], in chunks of
    chunk_tokens rows. top_k > 0 is for scoring only (no gradient is kept then)."""
    logits2d = logits.reshape(-1, logits.shape[-1])
    index, targets = index.to(logits2d.device), targets.to(logits2d.device)
    if top_k <= 0:
        lp, ent = _ChunkedLogprob.apply(logits2d, index, targets, temperature, chunk_tokens, with_entropy)
        return ChunkedStats(lp, ent)
    with torch.no_grad():
        parts = []
        for a, b in _chunks(index.numel(), chunk_tokens):
            z = logits2d.index_select(0, index[a:b]).float().div_(temperature)
            parts.append(_stats_of_chunk(z, targets[a:b], with_entropy, top_k)[1:])
        n, dev = index.numel(), logits2d.device
        if not parts:
            empty = torch.zeros(0, device=dev)
            return ChunkedStats(empty, empty, torch.zeros((0, top_k), dtype=torch.long, device=dev),
                                torch.zeros((0, top_k), device=dev))  # fmt: skip
        lp = torch.cat([p[0] for p in parts])
        ent = torch.cat([p[1] for p in parts]) if with_entropy else torch.zeros(n, device=dev)
        return ChunkedStats(lp, ent, torch.cat([p[2][0] for p in parts]), torch.cat([p[2][1] for p in parts]))
