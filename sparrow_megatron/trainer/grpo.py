"""GRPO objective: group-normalised advantages, PPO clip with dual clip, truncated IS, k3 KL.

Pure torch on per-token tensors so it can be checked by hand; the trainer feeds it the log-probs of one
micro-batch and per-token weights that already carry the global loss normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparrow_megatron.errors import UserError

# exp() of a log-ratio beyond this overflows float32 soon after (e^88); the reference clamps here too, so
# a token whose log-probs drifted apart gets a large but finite ratio (its gradient is then cut).
LOG_RATIO_CLAMP = 20.0
# The k3 KL term per token is bounded to this, as the reference does, so one token cannot dominate.
KL_CLAMP = 10.0


def group_advantages(
    rewards: Sequence[float] | torch.Tensor, group_ids: Sequence, eps: float = 1e-6, std: str = "unbiased"
) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps); one value per sample.

    std (grpo.std): "unbiased" divides the group variance by n - 1 (torch.std's default, which the
    reference's GRPO uses), "biased" by n. A group of one sample, or of equal rewards, gets advantage 0.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if std not in ("unbiased", "biased"):
        raise UserError(f"group_advantages: std must be 'unbiased' or 'biased', got {std!r}")
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
        # Equal rewards (or a single sample) carry no signal: advantage 0, never 0/0.
        if len(idx) < 2:
            continue
        sd = vals.std(unbiased=std == "unbiased")
        out[sel] = 0.0 if sd == 0 else (vals - vals.mean()) / (sd + eps)
    return out.float()


@dataclass(frozen=True)
class GRPOCoefs:
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0
    tis_cap: float | None = 3.0  # None: no truncated importance sampling (weight 1)
    kl_coef: float = 0.0


def _clamped_log_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # An infinite difference (a -inf log-prob on one side) clamps to the bound, with zero gradient.
    return (a - b).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def tis_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float | None
) -> torch.Tensor:
    """min(exp(logp_old_dense - logp_rollout), C), no gradient; all ones when cap is None."""
    if cap is None:
        return torch.ones_like(old_logprobs)
    return torch.exp(_clamped_log_ratio(old_logprobs.detach(), rollout_logprobs.detach())).clamp(max=cap)


def grpo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    coefs: GRPOCoefs,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO loss and per-token indicator/value tensors for metrics (same shape as logprobs)."""
    log_ratio = _clamped_log_ratio(logprobs, old_logprobs.detach())
    ratio = torch.exp(log_ratio)
    adv = advantages
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - coefs.eps_low, 1 + coefs.eps_high)
    pg = torch.maximum(unclipped, clipped)
    clip_active = (clipped > unclipped).float()
    # Which side of the band cut the gradient: high = ratio above 1 + eps_high on a positive advantage,
    # low = ratio below 1 - eps_low on a negative one.
    clip_high = clip_active * (adv > 0).float()
    clip_low = clip_active * (adv < 0).float()
    # Dual clip: for negative advantages the loss is bounded by -c * A however large the ratio gets.
    dual_bound = -adv * coefs.dual_clip
    dual_active = ((adv < 0) & (pg > dual_bound)).float()
    pg = torch.where(adv < 0, torch.minimum(pg, dual_bound), pg)
    tis = tis_weights(old_logprobs, rollout_logprobs, coefs.tis_cap)
    tis_raw = torch.exp(_clamped_log_ratio(old_logprobs.detach(), rollout_logprobs.detach()))
    loss = tis * pg
    kl = torch.zeros_like(logprobs)
    if coefs.kl_coef > 0:
        if ref_logprobs is None:
            raise UserError("kl_coef > 0 needs ref_logprobs in the batch (log-probs of the frozen reference)")
        # k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0, on the clamped
        # log-ratio and itself bounded (as the reference), so an outlier token cannot give inf or NaN.
        d = _clamped_log_ratio(ref_logprobs.detach(), logprobs)
        kl = (torch.exp(d) - d - 1).clamp(-KL_CLAMP, KL_CLAMP)
        loss = loss + coefs.kl_coef * kl
    stats = {
        "clip_frac": clip_active,
        "clip_frac_low": clip_low,
        "clip_frac_high": clip_high,
        "dual_clip_frac": dual_active,
        "tis_weight": tis,
        "tis_clipped": (tis_raw > coefs.tis_cap).float()
        if coefs.tis_cap is not None
        else torch.zeros_like(tis),
        "kl": kl.detach(),
        "ratio": ratio.detach(),
        # k3 estimate of KL(pi_old || pi) on tokens sampled from pi_old: r - 1 - log r >= 0, 0 on-policy.
        "approx_kl": (ratio - 1 - log_ratio).detach(),
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
