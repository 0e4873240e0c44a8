"""Per-token acceptance rate alpha = sum_v min(p(v), q(v)) = 1 - TV(p, q).

p is the dense policy, q the sparse actor that rollout sampled from. In production only top-K lists
are available from the engine and the trainer, so `acceptance_from_topk` brackets alpha:
- lower: sum of min(p, q) over the ids both lists hold (every other term is >= 0);
- upper: lower + min(1 - P(overlap), 1 - Q(overlap)), the mass either distribution has left outside
  the overlap, which bounds every term not yet counted;
- estimate: lower + the terms of ids held by one list only, each capped by the other list's smallest
  listed probability (an unlisted id cannot be more likely than the list's floor), clipped to
  [lower, upper]. All three equal the exact alpha when the lists cover the vocabulary.
"""

from __future__ import annotations

import torch

PAD_ID = -1


def acceptance_rate(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact alpha over the last (vocab) dim of two full log-prob tensors of any leading shape."""
    return torch.minimum(p_logprobs.exp(), q_logprobs.exp()).sum(dim=-1).clamp(0.0, 1.0)


def acceptance_from_topk(
    p_ids: torch.Tensor,
    p_logprobs: torch.Tensor,
    q_ids: torch.Tensor,
    q_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(estimate, lower, upper) per token from top-K lists: ids/logprobs [..., Kp] and [..., Kq].

    Ids may come in any order and Kp may differ from Kq. Padded entries (id -1) and -inf log-probs
    count as absent. A token with an empty list on either side gets NaN (no information).
    """
    p_valid = p_ids != PAD_ID
    q_valid = q_ids != PAD_ID
    p = torch.where(p_valid, p_logprobs.double().exp(), 0.0).nan_to_num(0.0)
    q = torch.where(q_valid, q_logprobs.double().exp(), 0.0).nan_to_num(0.0)

    same = (p_ids[..., :, None] == q_ids[..., None, :]) & p_valid[..., :, None] & q_valid[..., None, :]
    lower = (same * torch.minimum(p[..., :, None], q[..., None, :])).sum(dim=(-1, -2))
    p_in_overlap = same.any(dim=-1)
    q_in_overlap = same.any(dim=-2)
    p_overlap_mass = (p * p_in_overlap).sum(-1)
    q_overlap_mass = (q * q_in_overlap).sum(-1)
    upper = lower + torch.minimum(1.0 - p_overlap_mass, 1.0 - q_overlap_mass).clamp(min=0.0)

    inf = torch.tensor(float("inf"), dtype=p.dtype)
    p_floor = torch.where(p_valid & (p > 0), p, inf).amin(-1)
    q_floor = torch.where(q_valid & (q > 0), q, inf).amin(-1)
    p_only = p_valid & ~p_in_overlap
    q_only = q_valid & ~q_in_overlap
    extra = (torch.where(p_only, torch.minimum(p, q_floor[..., None]), 0.0)).sum(-1) + (
        torch.where(q_only, torch.minimum(q, p_floor[..., None]), 0.0)
    ).sum(-1)
    upper = upper.clamp(max=1.0)
    lower = lower.clamp(max=1.0)
    estimate = torch.minimum(torch.maximum(lower + extra, lower), upper)

    empty = ~(p_valid & (p > 0)).any(-1) | ~(q_valid & (q > 0)).any(-1)
    nan = torch.tensor(float("nan"), dtype=p.dtype)
    out_dtype = p_logprobs.dtype if p_logprobs.is_floating_point() else torch.float32
    return tuple(torch.where(empty, nan, x).to(out_dtype) for x in (estimate, lower, upper))
