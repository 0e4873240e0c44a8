"""Optimizer, gradient clipping and LR schedule.

GPU: Megatron's (distributed) optimizer. CPU: torch AdamW over the DDP `main_grad` buffers, because the
Megatron optimizer hard-codes CUDA tensors. Both are driven by the same `lr_at` and report the same
grad norm (over unique parameters: TP duplicates and the tied-embedding copy counted once).
"""

from __future__ import annotations

import math

import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer import compat
from sparrow_megatron.trainer.config import TrainerConfig


def lr_at(cfg: TrainerConfig, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant, or a cosine or
    linear decay from lr to min_lr reached at `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _grads_for_norm(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    return [
        p.main_grad
        for p in params
        if getattr(p, "main_grad", None) is not None
        and param_is_not_shared(p)
        and param_is_not_tensor_parallel_duplicate(p)
    ]


def global_grad_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of the full model's gradient (sum of squares all-reduced over the TP x PP group)."""
    from megatron.core import parallel_state

    grads = _grads_for_norm(params)
    sq = torch.zeros((), dtype=torch.float64, device=compat.device())
    for g in grads:
        sq += g.double().pow(2).sum()
    if parallel_state.get_model_parallel_group() is not None and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    return float(sq.sqrt())


class CpuAdamW:
    """torch AdamW whose .grad is the DDP main_grad; clipping is applied before the step."""

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig):
        self.cfg = cfg
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for _, p in self.named if p.ndim >= 2]
        no_decay = [p for _, p in self.named if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        )

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, lr: float) -> float:
        params = [p for _, p in self.named]
        norm = global_grad_norm(params)
        scale = 1.0
        if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
            scale = self.cfg.grad_clip / (norm + 1e-6)
        for p in params:
            g = p.main_grad
            p.grad = (g * scale if scale != 1.0 else g).to(p.dtype)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return norm

    # Checkpoints: the AdamW moments become ShardedTensors shaped like their parameters' (Megatron's own
    # helpers, as its non-distributed optimizer does), so they reshard across TP x PP with the model.
    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        # Before the first step AdamW has no state: write (and, loading, fill) the state AdamW starts
        # from (step 0, zero moments), so every checkpoint has the same keys whenever it was taken.
        for _, p in self.named:
            if is_loading or not self.opt.state.get(p):
                self.opt.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(
                        p, dtype=torch.float32, memory_format=torch.preserve_format
                    ),
                }
        state = self.opt.state_dict()
        params = [p for group in self.opt.param_groups for p in group["params"]]
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, params)
        steps = {float(s["step"]) for s in state["state"].values()}
        if len(steps) > 1:
            raise RuntimeError(f"CpuAdamW: parameters at different steps {sorted(steps)}")
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        state["common_step"] = steps.pop() if steps else 0.0
        return state

    def load_sharded_state_dict(self, state: dict) -> None:
        step = torch.tensor(float(state.pop("common_step")), dtype=torch.float32)
        for param_state in state["state"].values():
            param_state["step"] = step.clone()
        self.opt.load_state_dict(state)


class MegatronOptimizer:
    """Megatron's distributed optimizer (GPU): fp32 main params, sharded state, its own clipping."""

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, bf16: bool):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ocfg = OptimizerConfig(
            **compat.dataclass_kwargs(
                OptimizerConfig,
                optimizer="adam",
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.adam_beta1,
                adam_beta2=cfg.adam_beta2,
                adam_eps=cfg.adam_eps,
                clip_grad=cfg.grad_clip,
                bf16=bf16,
                params_dtype=torch.bfloat16 if bf16 else torch.float32,
                use_distributed_optimizer=True,
            )
        )
        self.opt = get_megatron_optimizer(ocfg, [model])

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """Megatron's own, in its canonical per-parameter layout ("fully_reshardable"): a checkpoint
        resumes under another TP x PP x DP."""
        if is_loading:
            self._materialize_state()
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        return compat.call_with_supported(
            self.opt.sharded_state_dict, model_sharded_state_dict, is_loading=is_loading, metadata=metadata
        )

    def load_sharded_state_dict(self, state: dict) -> None:
        try:
            self.opt.load_state_dict(state)
        except KeyError as exc:
            if exc.args != ("step",):
                raise
            # megatron-core 0.16.1 and 0.19.2 over torch's Adam (no TE/Apex): the fully_reshardable
            # loader copies every per-parameter state key but torch Adam's 'step'. TE/Apex FusedAdam
            # keep the step in the param group and load fine; the GPU image has TE.
            raise UserError(
                "resuming Megatron's distributed optimizer needs Transformer Engine or Apex (FusedAdam): "
                "this megatron-core cannot load its state into torch's Adam (KeyError 'step')"
            ) from exc

    def _materialize_state(self) -> None:
        """A never-stepped DistributedOptimizer has no state and its state_dict() asserts, so a resume
        into a fresh one would fail. Megatron's own remedy (its fsdp_dtensor load path): dummy states,
        every value of which the load overwrites."""
        for opt in getattr(self.opt, "chained_optimizers", [self.opt]):
            inner = getattr(opt, "optimizer", None)
            if (
                inner is not None
                and not inner.state
                and hasattr(opt, "_init_optimizer_states_with_dummy_values")
            ):
                opt._init_optimizer_states_with_dummy_values()

    def step(self, lr: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        _, grad_norm, _ = self.opt.step()
        return float(grad_norm or 0.0)
