"""Megatron-Core GRPO trainer for Qwen3: build, load, score, train, checkpoint, export (TP/PP, CPU or GPU).

Heavy imports (megatron, torch.distributed) happen inside the modules that need them.
"""

from sparrow_megatron.trainer.batch import RolloutBatch, pack_micro_batches
from sparrow_megatron.trainer.config import TrainerConfig
from sparrow_megatron.trainer.grpo import GRPOCoefs, group_advantages, grpo_token_loss, tis_weights

__all__ = [
    "GRPOCoefs",
    "Policy",
    "RolloutBatch",
    "ScoreResult",
    "TrainerConfig",
    "group_advantages",
    "grpo_token_loss",
    "init_distributed",
    "pack_micro_batches",
    "tis_weights",
]


def __getattr__(name: str):
    if name in ("Policy", "ScoreResult", "init_distributed"):
        from sparrow_megatron.trainer import policy

        return getattr(policy, name)
    raise AttributeError(name)
