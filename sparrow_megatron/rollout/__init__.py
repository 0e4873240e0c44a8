"""The SGLang rollout fleet client the RL loop uses: launch/attach engines, generate with top-K
log-probs under a per-request schedule, push weights and DistillSparse adapters, survive dead engines."""

from sparrow_megatron.rollout.config import LoraServerConfig, RolloutConfig
from sparrow_megatron.rollout.engine import Engine, EngineFailure, RequestRejected
from sparrow_megatron.rollout.fleet import ACTIVE, RolloutError, RolloutFleet
from sparrow_megatron.rollout.types import EngineStats, RolloutBatch, Sample, SamplingParams, topk_tensors
from sparrow_megatron.rollout.weights import DistributedGroupSpec, encode_named_tensors, rebucket

__all__ = [
    "ACTIVE",
    "DistributedGroupSpec",
    "Engine",
    "EngineFailure",
    "EngineStats",
    "LoraServerConfig",
    "RequestRejected",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutError",
    "RolloutFleet",
    "Sample",
    "SamplingParams",
    "encode_named_tensors",
    "rebucket",
    "topk_tensors",
]
