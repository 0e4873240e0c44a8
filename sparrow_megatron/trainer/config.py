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


@dataclass
class TrainerConfig:
    tp: int = 1
    pp: int = 1
    lr: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: LrSchedule = "constant"  # after warmup; cosine and linear decay to min_lr at loop.steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 16384  # token budget per micro-batch (padded length x rows)
    dtype: TrainDtype = "bf16"
    min_lr: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sequence_parallel: bool = False  # GPU only; ignored (forced off) on CPU

    def problems(self, prefix: str = "trainer.") -> list[str]:
        p = Problems(prefix)
        p.at_least(1, tp=self.tp, pp=self.pp, micro_batch_tokens=self.micro_batch_tokens)
        p.at_least(0, warmup_steps=self.warmup_steps)
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
    tis_cap: float = 2.0
    kl_coef: float = 0.0
    loss_agg: LossAgg = "token-mean"
    adv_eps: float = 1e-6

    def problems(self, prefix: str = "grpo.") -> list[str]:
        p = Problems(prefix)
        p.non_negative(kl_coef=self.kl_coef, adv_eps=self.adv_eps, eps_high=self.eps_high)
        p.need(0 <= self.eps_low < 1, "eps_low", f"must be in [0, 1), got {self.eps_low}")
        p.need(
            self.dual_clip > 1, "dual_clip", f"must be > 1 (it bounds rho*A from below), got {self.dual_clip}"
        )
        p.need(self.tis_cap >= 1, "tis_cap", f"must be >= 1, got {self.tis_cap}")
        return p


@dataclass
class DistillConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    # SGLang fuses q/k/v and gate/up: an adapter must target each fused group whole.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    kl_lambda: float = 1e-3
    lr: float = 1e-4

    def problems(self, prefix: str = "distill.") -> list[str]:
        p = Problems(prefix)
        p.at_least(1, rank=self.rank)
        p.positive(lr=self.lr, alpha=self.alpha)
        p.non_negative(kl_lambda=self.kl_lambda)
        p.need(
            bool(self.target_modules) or not self.enabled, "target_modules", "is empty while distill.enabled"
        )
        return p
