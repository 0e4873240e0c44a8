"""The trainer's sections of the job config: `trainer` (parallelism, optimizer, schedule), `grpo` (the
loss) and `distill` (DistillSparse's adapter). `Policy(trainer, grpo, ...)` takes them as they are.

Kept free of torch so the job config loads (and validates) without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sparrow_megatron.validation import Problems

LrSchedule = Literal["constant", "cosine", "linear"]
# token-mean: every token of the batch weighs the same; seq-mean-token-mean: every sequence weighs
# the same (its tokens averaged); seq-mean-token-sum: sequences weigh the same, tokens summed within.
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
TrainDtype = Literal["fp32", "bf16"]
# Megatron's recompute_granularity: none; selective (core attention and the MLP, from their inputs);
# full (whole layers, grouped by recompute_method / recompute_num_layers).
Recompute = Literal["none", "selective", "full"]
# full recompute: uniform = checkpoint every group of recompute_num_layers layers; block = checkpoint
# only the first recompute_num_layers layers of each pipeline stage.
RecomputeMethod = Literal["uniform", "block"]
GroupStd = Literal["unbiased", "biased"]
# DistillSparse's sparse forward in training: replay = every position attends under the budget its
# rollout decode step had (the schedule's, exact); fixed = one budget at every response position (the
# paper's appendix training mode), the prompt dense as in the prefill.
BudgetMode = Literal["replay", "fixed"]
# Truncated responses (SGLang finish_reason "length"): none = scored as they are; mask = left out of the
# loss (still in their group's advantage baseline); penalty = DAPO's soft overlong penalty added to the
# reward of every response that reaches the last grpo.overlong_buffer tokens of data.max_response_tokens.
Overlong = Literal["none", "mask", "penalty"]
# Every linear layer of a Qwen3 decoder layer ("all-linear" in PEFT and the reference's
# sparse_target_modules): the adapter default. ["q_proj", "k_proj", "v_proj", "o_proj"] is attention only.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainerConfig:
    tp: int = 1
    pp: int = 1
    lr: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: LrSchedule = "constant"  # after warmup; cosine and linear decay to min_lr at loop.steps
    weight_decay: float = 0.01  # the reference's AdamW (verl's actor optimizer default)
    grad_clip: float = 1.0
    micro_batch_tokens: int = 16384  # token budget per micro-batch (packed tokens; padded: rows x longest)
    dtype: TrainDtype = "bf16"
    min_lr: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Long context (docs/trainer.md): activation recompute, sequence / context parallelism, log-prob chunks.
    recompute: Recompute = "none"
    recompute_method: RecomputeMethod = "uniform"
    recompute_num_layers: int = 1  # full: layers per checkpoint (uniform) or checkpointed layers (block)
    # Norm activations split over the TP ranks. None = on when tp > 1.
    sequence_parallel: bool | None = None
    cp: int = 1  # context parallel size (needs Transformer Engine's attention)
    logprob_chunk_tokens: int = 4096  # response tokens per fp32 [chunk, V/tp] log-prob/entropy/top-K chunk
    # Checkpoint shards written in the background (Megatron-Core's async dist_checkpointing save): the
    # step goes on while they are written; the checkpoint counts once every rank finished (docs/cluster.md).
    async_save: bool = False

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)

    def problems(self, prefix: str = "trainer.") -> list[str]:
        p = Problems(prefix)
        p.at_least(1, tp=self.tp, pp=self.pp, micro_batch_tokens=self.micro_batch_tokens)
        p.at_least(1, cp=self.cp, recompute_num_layers=self.recompute_num_layers)
        p.at_least(1, logprob_chunk_tokens=self.logprob_chunk_tokens)
        p.need(
            not (self.sequence_parallel and self.tp == 1),
            "sequence_parallel",
            "needs tp > 1 (it splits activations over the TP ranks)",
        )
        p.at_least(0, warmup_steps=self.warmup_steps)
        p.need(
            isinstance(self.async_save, bool), "async_save", f"must be true or false, got {self.async_save!r}"
        )
        p.positive(adam_eps=self.adam_eps)
        # lr 0 is a frozen policy (scores and tails without updates), which the optimizer runs as is.
        p.non_negative(
            lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip, min_lr=self.min_lr
        )
        p.need(self.min_lr <= self.lr, "min_lr", f"{self.min_lr} is above trainer.lr {self.lr}")
        for name, beta in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)]:
            p.need(0 <= beta < 1, name, f"must be in [0, 1), got {beta}")
        return p


@dataclass
class GRPOConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0
    # Truncated IS cap on exp(logp_old_dense - logp_rollout). 3.0: the reference's code example (its math
    # example disables TIS, a DAPO TIS recipe uses 2.0); null disables it.
    tis_cap: float | None = 3.0
    kl_coef: float = 0.0  # must stay 0: no frozen reference policy supplies reference log-probs yet
    loss_agg: LossAgg = "token-mean"
    adv_eps: float = 1e-6
    # Group std of the advantage: divide by n - 1 (torch.std's default, the reference's GRPO) or by n.
    std: GroupStd = "unbiased"
    # Optimizer steps per RL step: the batch is split into this many mini-batches (GRPO groups kept
    # whole), old log-probs fixed before the first; 1 = the reference's examples. Under DistillSparse the
    # adapter update takes the same mini-batches, one adapter step each.
    mini_batches: int = 1
    overlong: Overlong = "none"
    # penalty: the last tokens before data.max_response_tokens over which it ramps from 0 to -1 (DAPO:
    # 4096 of 20480); 0 = -1 only for a response that reaches the cutoff.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0  # penalty: its weight (DAPO's penalty_factor)
    # DAPO dynamic sampling: groups whose rewards are all equal are dropped and further prompts sampled
    # until loop.prompts_per_step groups carry signal, at most max_sampling_rounds rollouts per step.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3

    def problems(self, prefix: str = "grpo.") -> list[str]:
        p = Problems(prefix)
        p.non_negative(kl_coef=self.kl_coef, adv_eps=self.adv_eps, eps_high=self.eps_high)
        p.at_least(1, mini_batches=self.mini_batches, max_sampling_rounds=self.max_sampling_rounds)
        p.at_least(0, overlong_buffer=self.overlong_buffer)
        p.non_negative(overlong_penalty=self.overlong_penalty)
        p.need(0 <= self.eps_low < 1, "eps_low", f"must be in [0, 1), got {self.eps_low}")
        p.need(
            self.dual_clip > 1, "dual_clip", f"must be > 1 (it bounds rho*A from below), got {self.dual_clip}"
        )
        p.need(
            self.tis_cap is None or self.tis_cap >= 1,
            "tis_cap",
            f"must be >= 1 or null (off), got {self.tis_cap}",
        )
        p.need(
            self.kl_coef == 0,
            "kl_coef",
            f"is {self.kl_coef}, but a KL penalty needs a frozen reference policy's log-probs and none is "
            "kept yet, so the trainer has no reference log-probs: set grpo.kl_coef=0 (the reference's "
            "examples use 0 too)",
        )
        return p


@dataclass
class DistillConfig:
    enabled: bool = False
    # Rank and alpha are our choice: the paper does not give them, and the reference code's examples
    # leave DistillSparse off (its defaults: sparse_lora_rank 0, sparse_lora_alpha 16).
    rank: int = 16
    alpha: float = 32.0
    # SGLang fuses q/k/v and gate/up: an adapter must target each fused group whole.
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    kl_lambda: float = 1e-3
    lr: float = 1e-4
    # TIS cap of the DistillSparse phase, separate from grpo.tis_cap as the reference's
    # sparse_tis_imp_ratio_cap; null (its default, -1 there) trains the adapter without TIS.
    tis_cap: float | None = None
    budget_mode: BudgetMode = "replay"
    # tokens, for budget_mode=fixed; null = the schedule's largest budget. Checked against the schedule's
    # page geometry where the schedule is resolved (the job config's cross-section checks).
    fixed_budget: int | None = None

    def problems(self, prefix: str = "distill.") -> list[str]:
        p = Problems(prefix)
        p.at_least(1, rank=self.rank)
        p.positive(lr=self.lr, alpha=self.alpha)
        p.non_negative(kl_lambda=self.kl_lambda)
        p.need(
            self.tis_cap is None or self.tis_cap >= 1,
            "tis_cap",
            f"must be >= 1 or null (off), got {self.tis_cap}",
        )
        p.need(
            bool(self.target_modules) or not self.enabled, "target_modules", "is empty while distill.enabled"
        )
        p.need(
            self.fixed_budget is None or self.fixed_budget > 0,
            "fixed_budget",
            f"must be a positive number of tokens or null, got {self.fixed_budget}",
        )
        p.need(
            self.fixed_budget is None or self.budget_mode == "fixed",
            "fixed_budget",
            f"is set but distill.budget_mode is '{self.budget_mode}' (it is read only when 'fixed')",
        )
        return p
