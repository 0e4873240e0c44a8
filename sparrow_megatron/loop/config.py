"""The loop's sections of the job config: `monitor` (with its `controller`), `loop` and `tracking`.

Kept free of torch and MLflow so the job config loads (and validates) without importing the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sparrow_megatron.validation import Problems

# Which acceptance value a p5 is taken of (monitor, controller, calibration, `sparrow tail`): the lower
# bound (sum of min(p, q) over the ids both top-K lists hold, the reference's `sum_min_from_topk`, with
# which tau = 0.86 was derived), the point estimate, or the upper bound a truncated list allows.
TailSignal = Literal["lower", "estimate", "upper"]
# How the rollout of a step relates to the update of the previous one (loop/overlap.py): `none` runs
# them one after the other; `one_step` generates step n+1's batch with weights n while the trainer
# updates on step n (TIS corrects the one-step lag).
Overlap = Literal["none", "one_step"]


@dataclass
class ControllerConfig:
    """Online budget controller: off by default; acts per position bin on the live p5."""

    enabled: bool = False
    margin: float = 0.02  # raise below tau - margin, lower above tau + margin
    patience: int = 5  # consecutive steps above tau + margin before lowering
    min_budget: int = 256
    max_budget: int = 16384
    # Budgets the controller moves between (multiples of the page size); empty = steps of step_tokens.
    ladder: list[int] = field(default_factory=list)
    step_tokens: int = 256  # 16 pages of 16 tokens, the calibration grid

    def problems(
        self, prefix: str = "monitor.controller.", page_size: int = 16, min_budget: int = 48
    ) -> list[str]:
        """`page_size` and `min_budget` (sink + local pages): the schedule's geometry."""
        p = Problems(prefix)
        p.at_least(1, patience=self.patience)
        p.non_negative(margin=self.margin)
        p.need(
            self.min_budget <= self.max_budget,
            "min_budget",
            f"{self.min_budget} is above {prefix}max_budget {self.max_budget}",
        )
        p.need(
            self.min_budget >= min_budget,
            "min_budget",
            f"must hold the sink and local pages ({min_budget} tokens), got {self.min_budget}",
        )
        for name, value in [
            ("min_budget", self.min_budget),
            ("max_budget", self.max_budget),
            ("step_tokens", self.step_tokens),
        ]:
            p.need(
                value > 0 and value % page_size == 0,
                name,
                f"must be a positive multiple of the page size {page_size}, got {value}",
            )
        for i, b in enumerate(self.ladder):
            p.need(
                b % page_size == 0 and self.min_budget <= b <= self.max_budget,
                f"ladder[{i}]",
                f"{b} must be a multiple of the page size {page_size} within [min_budget, max_budget]",
            )
        return p


@dataclass
class MonitorConfig:
    tau: float = 0.86
    bin_width: int = 2000
    consecutive_steps: int = 3  # k: steps with p5 < tau in a bin before the warning
    min_bin_tokens: int = 20  # a bin with fewer tokens is not "populated": its p5 is noise
    signal: TailSignal = "lower"  # the reference's metric; estimate >= lower, so it passes a looser test
    beta_fit: bool = False  # the per-step Beta fit costs time; calibration does it
    controller: ControllerConfig = field(default_factory=ControllerConfig)

    def problems(self, prefix: str = "monitor.") -> list[str]:
        """The monitor's own fields; the controller is checked against the schedule by the job config."""
        p = Problems(prefix)
        p.at_least(1, bin_width=self.bin_width, consecutive_steps=self.consecutive_steps,
                   min_bin_tokens=self.min_bin_tokens)  # fmt: skip
        p.need(0 < self.tau < 1, "tau", f"must be in (0, 1), got {self.tau}")
        return p


@dataclass
class LoopConfig:
    steps: int = 20
    prompts_per_step: int = 8
    # Periodic evaluation of every eval set (data.eval; the synthetic task's own eval split), dense and
    # sparse: mean@n and unbiased pass@k, before the first step and after every eval_every-th and the last.
    # 0 = none.
    eval_every: int = 0
    eval_prompts: int = 0  # the first N of each set; 0 = the whole set (synthetic: prompts_per_step)
    eval_samples: int = 4  # n samples per prompt: pass@k for k = 1, 2, 4, ... up to n, and n
    eval_pass_reward: float = 1.0  # a sample passes (for pass@k) when its reward reaches this
    eval_max_response_tokens: int = 0  # evaluation's generation cutoff; 0 = data.max_response_tokens
    checkpoint_every: int = 10  # 0 = only the final checkpoint
    # Also checkpoint once this many seconds have passed since the last one (0 = off): a time limit or
    # a lost node then costs at most about this much work, whatever a step takes (loop/preempt.py).
    checkpoint_every_s: float = 0.0
    overlap: Overlap = "none"
    seed: int = 0
    run_dir: str = "runs/sparrow"
    # Every step's samples (ids, engine and trainer log-probs, rewards) to <run_dir>/rollouts/ as JSON
    # lines (loop/rollout_dump.py): for debugging a run token by token; large at long lengths.
    dump_rollouts: bool = False

    def problems(self, prefix: str = "loop.") -> list[str]:
        p = Problems(prefix)
        p.at_least(
            1, steps=self.steps, prompts_per_step=self.prompts_per_step, eval_samples=self.eval_samples
        )
        p.at_least(0, eval_every=self.eval_every, eval_prompts=self.eval_prompts,
                   checkpoint_every=self.checkpoint_every,
                   eval_max_response_tokens=self.eval_max_response_tokens)  # fmt: skip
        p.non_negative(checkpoint_every_s=self.checkpoint_every_s)
        p.non_empty(run_dir=self.run_dir)
        return p


@dataclass
class TrackingConfig:
    # empty = sqlite:///<run_dir>/../mlflow.db: one store for the run directories beside each other
    mlflow_uri: str = ""
    experiment: str = ""  # empty = the job's name (one experiment per recipe)
    run_name: str = ""  # empty = the run directory's name
    # The final weights are referenced by path and sha256; copied into the artifact store only when
    # smaller than this many MB (0 = never).
    copy_weights: int = 1024

    def problems(self, prefix: str = "tracking.") -> list[str]:
        p = Problems(prefix)
        p.at_least(0, copy_weights=self.copy_weights)
        return p
