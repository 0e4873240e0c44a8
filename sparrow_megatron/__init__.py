"""Sparrow-Megatron: sparse-rollout GRPO for Qwen3 (SGLang block-sparse decode + Megatron-Core)."""

__version__ = "0.1.0"
