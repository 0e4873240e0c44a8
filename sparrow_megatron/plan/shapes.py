"""What the memory plan is computed from: the model's shape and the trainer's parallel and memory settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparrow_megatron.sparsity.cost import ModelShape
from sparrow_megatron.trainer.config import Recompute, RecomputeMethod

# "te": Transformer Engine's fused layers (the GPU path: fused RMSNorm + linear, fused SwiGLU, flash
# attention). "local": Megatron's local spec (the CPU path: torch RMSNorm computed in fp32, unfused
# SwiGLU), with flash-style attention.
LayerSpec = Literal["te", "local"]


@dataclass(frozen=True)
class TrainerShape:
    model: ModelShape
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    recompute: Recompute = "none"
    recompute_method: RecomputeMethod = "uniform"
    recompute_num_layers: int = 1
    micro_batch_tokens: int = 16384  # tokens of the longest (packed) micro-batch
    logprob_chunk_tokens: int = 0  # 0 (or >= the micro-batch) = the log-probs of a whole micro-batch at once
    distributed_optimizer: bool = True
    layer_spec: LayerSpec = "te"
    num_micro_batches: int = 1  # per DP rank and step: bounds the micro-batches in flight under PP

    @property
    def sp(self) -> int:
        """The divisor of the tensors that sequence parallelism shards (t_sp)."""
        return self.tp if self.sequence_parallel and self.tp > 1 else 1

    @property
    def layers_per_stage(self) -> int:
        return self.model.num_layers // self.pp
