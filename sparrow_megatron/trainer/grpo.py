"""GRPO objective: group-normalised advantages, PPO clip with dual clip, truncated IS, k3 KL.

Pure torch on per-token tensors so it can be checked by hand; the trainer feeds it the log-probs of one
micro-batch and per-token weights that already carry the global loss normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparrow_megatron.errors import UserError


def group_advantages(
    rewards: Sequence[float] | torch.Tensor, group_ids: Sequence, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps), std unbiased=False; one value per sample."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.ndim != 1 or len(group_ids) != r.numel():
        raise UserError(f"group_advantages: {r.numel()} rewards but {len(group_ids)} group ids")
    if not torch.isfinite(r).all():
        bad = int((~torch.isfinite(r)).nonzero()[0])
        raise UserError(f"group_advantages: reward of sample {bad} is not finite ({float(r[bad])})")
    out = torch.zeros_like(r)
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for idx in groups.values():
        sel = torch.tensor(idx)
        vals = r[sel]
        std = vals.std(unbiased=False)
        # Equal rewards (or a single sample) carry no signal: advantage 0, never 0/0.
        out[sel] = 0.0 if std == 0 else (vals - vals.mean()) / (std + eps)
    return out.float()


@dataclass(frozen=True)
class GRPOCoefs:
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0
    tis_cap: float = 2.0
    kl_coef: float = 0.0


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(logp_old_dense - logp_rollout), C), no gradient."""
    return torch.exp(old_logprobs.detach() - rollout_logprobs.detach()).clamp(max=cap)


def grpo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    coefs: GRPOCoefs,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO loss and per-token indicator/value tensors for metrics (same shape as logprobs)."""
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - coefs.eps_low, 1 + coefs.eps_high)
    pg = torch.maximum(unclipped, clipped)
    clip_active = (clipped > unclipped).float()
    # Dual clip: for negative advantages the loss is bounded by -c * A however large the ratio gets.
    dual_bound = -adv * coefs.dual_clip
    dual_active = ((adv < 0) & (pg > dual_bound)).float()
    pg = torch.where(adv < 0, torch.minimum(pg, dual_bound), pg)
    tis = tis_weights(old_logprobs, rollout_logprobs, coefs.tis_cap)
    tis_raw = torch.exp(old_logprobs.detach() - rollout_logprobs.detach())
    loss = tis * pg
    kl = torch.zeros_like(logprobs)
    if coefs.kl_coef > 0:
        if ref_logprobs is None:
            raise UserError("kl_coef > 0 needs ref_logprobs in the batch (log-probs of the frozen reference)")
        # k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0.
        d = ref_logprobs.detach() - logprobs
        kl = torch.exp(d) - d - 1
        loss = loss + coefs.kl_coef * kl
    stats = {
        "clip_frac": clip_active,
        "dual_clip_frac": dual_active,
        "tis_weight": tis,
        "tis_clipped": (tis_raw > coefs.tis_cap).float(),
        "kl": kl.detach(),
        "ratio": ratio.detach(),
        "pg_loss": (tis * pg).detach(),
    }
    return loss, stats


def token_weights(
    response_lengths: Sequence[int], loss_agg: str, global_tokens: int, global_seqs: int
) -> list[torch.Tensor]:
    """Per-token loss weights so that summing weight * loss over every token of every rank gives the
    aggregate: token-mean -> 1/global_tokens; seq-mean-token-mean -> 1/(len_i * global_seqs);
    seq-mean-token-sum -> 1/global_seqs."""
    out = []
    for n in response_lengths:
        if loss_agg == "token-mean":
            w = 1.0 / max(global_tokens, 1)
        elif loss_agg == "seq-mean-token-mean":
            w = 1.0 / (max(n, 1) * max(global_seqs, 1))
        elif loss_agg == "seq-mean-token-sum":
            w = 1.0 / max(global_seqs, 1)
        else:
            raise UserError(f"loss_agg: unknown aggregation {loss_agg!r}")
        out.append(torch.full((n,), w, dtype=torch.float64))
    return out
