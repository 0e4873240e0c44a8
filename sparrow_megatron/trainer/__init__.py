"""Megatron-Core GRPO trainer for Qwen3: build, load, score, train, checkpoint, export (TP/PP, CPU or GPU).

Names resolve lazily: importing the config sections (trainer.config) imports neither torch nor
megatron, and the heavy imports happen inside the modules that need them.
"""

import importlib

_HOME = {
    "DistillConfig": "config", "GRPOConfig": "config", "TrainerConfig": "config",
    "RolloutBatch": "batch", "pack_micro_batches": "batch",
    "GRPOCoefs": "grpo", "group_advantages": "grpo", "grpo_token_loss": "grpo", "tis_weights": "grpo",
    "Policy": "policy", "ScoreResult": "policy", "init_distributed": "policy",
}  # fmt: skip
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(name)
