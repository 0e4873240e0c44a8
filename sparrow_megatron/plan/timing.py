"""Predicted rollout and trainer time of one RL step.

Rollout: the eFLOPs cost model (sparsity/cost.py) at the roofline, so a lower bound: each engine decodes
its share of the step's sequences in waves of `concurrency` requests (weight reads shared by the wave),
every sequence to the generation cutoff (the step waits for its longest), over TP x the device's peak.
Trainer: the dense scoring forward plus the update's forward and backward (and the recompute forward
under full recompute), matmul and causal-attention FLOPs, at an assumed model FLOPs utilisation.
"""

from __future__ import annotations

import math

from sparrow_megatron.plan.shapes import TrainerShape
from sparrow_megatron.sparsity.cost import CostModel, Hardware, ModelShape
from sparrow_megatron.sparsity.schedule import Schedule


def rollout_seconds(
    model: ModelShape,
    hardware: Hardware,
    schedule: Schedule | None,
    prompt_len: int,
    gen_len: int,
    sequences: int,
    samples_per_prompt: int,
    engines: int,
    engine_tp: int,
    concurrency: int,
) -> float:
    per_engine = math.ceil(sequences / max(engines, 1))
    wave = max(1, min(concurrency, per_engine))
    waves = math.ceil(per_engine / wave)
    cm = CostModel(model, hardware, batch=wave)
    prompts = math.ceil(wave / samples_per_prompt)
    wave_cost = prompts * cm.prefill_cost(prompt_len) + wave * (
        cm.generation_cost(prompt_len, gen_len, 1, schedule) - cm.prefill_cost(prompt_len)
    )
    return waves * wave_cost / (engine_tp * hardware.bf16_flops)


def trainer_seconds(
    model: ModelShape,
    shape: TrainerShape,
    tokens: int,
    sequence_len: int,
    gpus: int,
    hardware: Hardware,
    mfu: float,
) -> float:
    """`tokens` in sequences of `sequence_len`: score (1 forward) + update (3, +1 with full recompute)."""
    if gpus < 1:
        return 0.0
    forward_per_token = 2.0 * model.matmul_params + 2.0 * sequence_len * model.num_heads * model.head_dim * (
        model.num_layers
    )  # causal attention: QK^T and AV over half the sequence on average, 2 FLOPs per MAC
    passes = 1 + 3 + (1 if shape.recompute == "full" else 0)
    return passes * forward_per_token * tokens / (gpus * hardware.bf16_flops * mfu)
