"""Per-GPU memory of the Megatron-Core trainer, term by term (bytes), for one pipeline stage.

The activation formula (bf16, flash attention, no dropout; s = tokens of the micro-batch / CP, t = TP,
t_sp = t with sequence parallelism else 1, q = heads * head_dim, kv = kv_heads * head_dim, f = FFN
width, a = heads) is, per layer without recompute,

    te:    M = 2s * [4h/t_sp + (4q + 3kv + 3f)/t] + 4s*a/t
    local: M = 2s * [10h/t_sp + (8q + 7kv + 5f)/t + 4d] + 4s*a/t

"te" is Transformer Engine's fused layer (the GPU path): per norm its input and output, per attention
q, k, v after RoPE, the q/k-norm inputs, the output and the fp32 log-sum-exp, per MLP the FC1 output
(2f) and the SwiGLU output (f). "local" is Megatron's local spec (the CPU path): the torch RMSNorm
keeps two fp32 copies of its input beside its bf16 output, the unfused SwiGLU keeps 5f, the q/k norms
their fp32 copies, the fused QKV output stays alive (V is a view of it), RoPE keeps its cos/sin per
layer. Every term is written out in docs/memory_plan.md; tests/plan checks "local" against MemTracker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparrow_megatron.plan.shapes import TrainerShape

GIB = 1 << 30
# CUDA context, NCCL communicators and buffers, cuBLAS workspaces, allocator slack: not modelled term by
# term, a fixed allowance per GPU.
RUNTIME_BYTES = 3 * GIB
# Weights (bf16) + gradients (fp32: grads are reduced in fp32) per parameter on every GPU; fp32 master
# weights + Adam's two moments sharded over DP x CP by the distributed optimizer.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 4, 12
# fp32 working set of the log-prob / entropy of a chunk of C tokens, in units of C * V/t: the fp32 copy of
# the logits, the shifted logits, their exp and the softmax (4 bytes each).
LOGPROB_CHUNK_FACTOR = 16


def local_tokens(shape: TrainerShape) -> int:
    """s: this GPU's tokens of the longest micro-batch (CP splits the sequence into 2*CP chunks; SP
    needs a multiple of TP)."""
    tokens = shape.micro_batch_tokens
    if shape.cp > 1:
        tokens = math.ceil(tokens / (2 * shape.cp)) * 2
    if shape.sp > 1:
        tokens = math.ceil(tokens / shape.sp) * shape.sp
    return tokens


def layer_activation_bytes(shape: TrainerShape, s: int | None = None) -> float:
    """M: the bytes one transformer layer keeps for backward without recompute."""
    m = shape.model
    s = local_tokens(shape) if s is None else s
    h, d, a, f = m.hidden_size, m.head_dim, m.num_heads, m.intermediate_size
    q, kv = m.num_heads * d, m.num_kv_heads * d
    t, tsp = shape.tp, shape.sp
    if shape.layer_spec == "te":
        per_token = 2 * (4 * h / tsp + (4 * q + 3 * kv + 3 * f) / t)
    else:
        per_token = 2 * (10 * h / tsp + (8 * q + 7 * kv + 5 * f) / t + 4 * d)
    return s * per_token + 4 * s * a / t


def checkpoint_bytes(shape: TrainerShape, s: int | None = None) -> float:
    """The input a full-recompute checkpoint keeps: one hidden state, SP-sharded."""
    s = local_tokens(shape) if s is None else s
    return 2 * s * shape.model.hidden_size / shape.sp


def backward_transient_bytes(shape: TrainerShape, s: int | None = None) -> float:
    """Gradients alive at once inside one layer's backward: FC1's output grad (2f) and the layer's."""
    s = local_tokens(shape) if s is None else s
    m = shape.model
    return 2 * s * (2 * m.intermediate_size / shape.tp + m.hidden_size / shape.sp)


def retained_per_micro_batch(shape: TrainerShape, layers: int | None = None) -> float:
    """What one micro-batch's forward leaves for its backward over this stage's layers."""
    n_layers = shape.layers_per_stage if layers is None else layers
    M = layer_activation_bytes(shape)
    if shape.recompute == "none":
        return n_layers * M
    if shape.recompute == "selective":
        # Megatron's default selective recompute is the core attention: with flash attention only its
        # fp32 log-sum-exp goes (q, k, v are saved as the recompute's inputs, the output by the
        # projection). It saves little; full recompute is what holds 37K tokens.
        m = shape.model
        return n_layers * (M - 4 * local_tokens(shape) * m.num_heads / shape.tp)
    n = max(1, min(shape.recompute_num_layers, n_layers))
    if shape.recompute_method == "uniform":
        return math.ceil(n_layers / n) * checkpoint_bytes(shape)
    return n * checkpoint_bytes(shape) + (n_layers - n) * M  # block: the first n layers recomputed


def recompute_working_bytes(shape: TrainerShape, layers: int | None = None) -> float:
    """The activations of the layer group being recomputed during backward (full recompute only)."""
    if shape.recompute != "full":
        return 0.0
    n_layers = shape.layers_per_stage if layers is None else layers
    n = max(1, min(shape.recompute_num_layers, n_layers))
    group = n if shape.recompute_method == "uniform" else 1
    return group * layer_activation_bytes(shape)


def logits_bytes(shape: TrainerShape) -> dict[str, float]:
    """Last stage: bf16 logits [s, V/t], their gradient, and the fp32 working set of one log-prob chunk."""
    s, v, t = local_tokens(shape), shape.model.vocab_size, shape.tp
    chunk = min(shape.logprob_chunk_tokens or s, s)
    return {
        "logits": 2.0 * s * v / t,
        "logits_grad": 2.0 * s * v / t,
        "logprob_chunk": float(LOGPROB_CHUNK_FACTOR * chunk * v / t),
    }


def stage_params(shape: TrainerShape, stage: int) -> float:
    """Parameters this GPU holds on pipeline stage `stage` (TP-sharded; norms are negligible)."""
    m = shape.model
    params = shape.layers_per_stage * m.layer_params
    first, last = stage == 0, stage == shape.pp - 1
    embed = m.vocab_size * m.hidden_size
    if first:
        params += embed
    if last:
        params += m.hidden_size  # final norm
        # The output layer: its own matrix when untied, and a copy of the embedding on the last stage
        # when tied under PP (Megatron keeps the two in sync by an all-reduce of their gradients).
        if not m.tied_embeddings or not first:
            params += embed
    return params / shape.tp


@dataclass(frozen=True)
class StageMemory:
    stage: int
    in_flight: int  # micro-batches whose activations this stage holds at its peak (1F1B)
    terms: dict[str, float]  # bytes

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def in_flight(shape: TrainerShape, stage: int) -> int:
    """1F1B: stage i runs pp - i forwards before its first backward (bounded by the micro-batches)."""
    return max(1, min(shape.pp - stage, shape.num_micro_batches))


def stage_memory(shape: TrainerShape, stage: int) -> StageMemory:
    params = stage_params(shape, stage)
    shard = shape.dp * shape.cp if shape.distributed_optimizer else 1
    flight = in_flight(shape, stage)
    s, m = local_tokens(shape), shape.model
    terms = {
        "weights": WEIGHT_BYTES * params,
        "gradients": GRAD_BYTES * params,
        "optimizer": OPTIMIZER_BYTES * params / shard,
        "activations": flight * retained_per_micro_batch(shape),
        "recompute": recompute_working_bytes(shape),
        "backward_transient": backward_transient_bytes(shape),
        # RoPE's fp32 frequencies [s, d] and, with SP, the all-gather buffer of one full hidden state.
        "rope_and_buffers": 4.0 * s * m.head_dim + (2.0 * s * m.hidden_size if shape.sp > 1 else 0.0),
    }
    if stage == shape.pp - 1:
        # Final norm and output-layer inputs (bf16, SP-sharded), then the logits and their chunk.
        terms["head_inputs"] = 2 * checkpoint_bytes(shape)
        terms.update(logits_bytes(shape))
    terms["runtime"] = float(RUNTIME_BYTES)
    return StageMemory(stage, flight, terms)


def trainer_memory(shape: TrainerShape) -> list[StageMemory]:
    """One StageMemory per pipeline stage (the first and the last differ: embedding vs logits)."""
    return [stage_memory(shape, i) for i in range(shape.pp)]
