"""The SGLang rollout fleet client the RL loop uses: launch/attach engines, generate with top-K
log-probs under a per-request schedule, push weights and DistillSparse adapters, survive dead engines.

Names resolve lazily, so that importing the config section (rollout.config) does not import torch.
"""

import importlib

_HOME = {
    "FleetOptions": "config", "LoraServerConfig": "config", "RolloutConfig": "config",
    "Engine": "engine", "EngineFailure": "engine", "RequestRejected": "engine",
    "ACTIVE": "fleet", "RolloutError": "fleet", "RolloutFleet": "fleet",
    "EngineStats": "types", "GenerationResult": "types", "Sample": "types", "SamplingParams": "types",
    "topk_tensors": "types",
    "DistributedGroupSpec": "weights", "encode_named_tensors": "weights", "rebucket": "weights",
}  # fmt: skip
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(name)
