"""Optimizer, gradient clipping and LR schedule.

GPU: Megatron's (distributed) optimizer. CPU: torch AdamW over the DDP `main_grad` buffers, because the
Megatron optimizer hard-codes CUDA tensors. Both are driven by the same `lr_at` and report the same
grad norm (over unique parameters: TP duplicates and the tied-embedding copy counted once).
"""

from __future__ import annotations

import math

import torch

from sparrow_megatron.trainer import compat
from sparrow_megatron.trainer.config import TrainerConfig


def lr_at(cfg: TrainerConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
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

    # Flat, name-keyed optimizer state: checkpoints must not depend on parameter order.
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.named:
            for key, value in self.opt.state.get(p, {}).items():
                out[f"{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.named:
            state = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
            if state:
                self.opt.state[p] = {k: v.clone() for k, v in state.items()}

    def state_template(self) -> dict[str, torch.Tensor]:
        """Empty tensors shaped like a post-first-step state (what a checkpoint holds)."""
        out = {}
        for name, p in self.named:
            out[f"{name}.step"] = torch.zeros((), dtype=torch.float32)
            out[f"{name}.exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            out[f"{name}.exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return out


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

    def step(self, lr: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        _, grad_norm, _ = self.opt.step()
        return float(grad_norm or 0.0)
