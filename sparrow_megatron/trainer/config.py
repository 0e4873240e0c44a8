"""TrainerConfig: everything the Megatron-Core GRPO trainer needs, as one typed dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparrow_megatron.errors import UserError


@dataclass
class TrainerConfig:
    model_dir: str = ""  # local HF Qwen3 directory (config.json + safetensors)
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel size (needs Transformer Engine's attention)
    # Sequence parallelism: LayerNorm/dropout activations split over TP ranks. None = on when tp > 1.
    sequence_parallel: bool | None = None
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    micro_batch_tokens: int = 4096  # token budget per micro-batch (packed tokens; padded: rows x longest)
    # Long context: activation recompute (Megatron's recompute_granularity / method / num_layers).
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1  # full: layers per checkpoint (uniform) or checkpointed layers (block)
    logprob_chunk_tokens: int = 4096  # response tokens per fp32 [chunk, V/tp] log-prob/entropy/top-K chunk
    pack_sequences: bool = True  # THD packing (no padding between samples); False = right-padded rows
    # optimizer and schedule
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int = 1000  # cosine horizon
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # GRPO
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0
    tis_cap: float = 2.0
    kl_coef: float = 0.0
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    adv_eps: float = 1e-6
    temperature: float = 1.0
    top_k_logprobs: int = 20
    seed: int = 1234

    def validate(self) -> None:
        def bad(field: str, why: str) -> UserError:
            return UserError(f"TrainerConfig: field '{field}' {why}")

        if not self.model_dir:
            raise bad("model_dir", "is empty; give a local HF Qwen3 directory")
        for name in ("tp", "pp", "cp", "micro_batch_tokens", "top_k_logprobs", "logprob_chunk_tokens"):
            if int(getattr(self, name)) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.recompute not in ("none", "selective", "full"):
            raise bad("recompute", f"must be 'none', 'selective' or 'full', got {self.recompute!r}")
        if self.recompute_method not in ("uniform", "block"):
            raise bad("recompute_method", f"must be 'uniform' or 'block', got {self.recompute_method!r}")
        if self.recompute == "full" and int(self.recompute_num_layers) < 1:
            raise bad("recompute_num_layers", f"must be >= 1, got {self.recompute_num_layers}")
        if self.sequence_parallel and self.tp == 1:
            raise bad("sequence_parallel", "needs tp > 1 (it splits activations over the TP ranks)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise bad("lr_schedule", f"must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean"):
            raise bad("loss_agg", f"must be 'token-mean' or 'seq-mean-token-mean', got {self.loss_agg!r}")
        if self.params_dtype not in ("float32", "bfloat16"):
            raise bad("params_dtype", f"must be 'float32' or 'bfloat16', got {self.params_dtype!r}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise bad("eps_low/eps_high", f"out of range: {self.eps_low}, {self.eps_high}")
        if self.dual_clip <= 1:
            raise bad("dual_clip", f"must be > 1, got {self.dual_clip}")
        if self.tis_cap <= 0:
            raise bad("tis_cap", f"must be > 0, got {self.tis_cap}")
        if self.temperature <= 0:
            raise bad("temperature", f"must be > 0, got {self.temperature}")
        if self.kl_coef < 0:
            raise bad("kl_coef", f"must be >= 0, got {self.kl_coef}")

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)
