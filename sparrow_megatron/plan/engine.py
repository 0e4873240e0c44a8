"""Per-GPU memory of one SGLang rollout engine: weights, KV pool, landmarks and SGLang's runtime reserve.

SGLang sizes its static memory (weights + KV pool) as `mem_fraction_static` of the device and leaves the
rest for activations and CUDA graphs; its default reserve (SGLang 0.5.23, `handle_gpu_memory_settings`)
is 512 MB + 1.5 MB per chunked-prefill token + TP/8 GB + 2 MB per decode CUDA-graph batch size, at
least 10 GB on devices above 60 GB. The pool gets what the weights leave of the static part, unless
`rollout.kv_pool_tokens` caps it. The sparse backend keeps one landmark (bf16, per KV head) per page of
16 tokens in every sparse layer, counted here with the pool's per-token cell.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparrow_megatron.sparsity.cost import ModelShape
from sparrow_megatron.sparsity.schedule import Schedule

MIB = 1 << 20
KV_BYTES = 2  # bf16 KV cache
WEIGHT_BYTES = 2


@dataclass(frozen=True)
class EngineShape:
    model: ModelShape
    tp: int
    schedule: Schedule | None  # None = dense: no landmarks
    kv_pool_tokens: int  # 0 = what SGLang's static budget leaves
    longest_sequence: int  # prompt + response tokens of the longest request


def sglang_reserve_bytes(device_bytes: float, tp: int) -> float:
    """SGLang's default non-static reserve (activations, CUDA graphs) on a device of this size."""
    mib = device_bytes / MIB
    if mib < 160 * 1024:  # H100, H200
        chunk, max_bs = 8192, 256 if tp < 4 else 512
    else:  # B200
        chunk, max_bs = 16384, 512
    reserve = 512 + chunk * 1.5 + tp / 8 * 1024 + max_bs * 2
    if mib > 60 * 1024:
        reserve = max(reserve, 10 * 1024)
    return reserve * MIB


def kv_cell_bytes(shape: EngineShape) -> tuple[float, float]:
    """(KV bytes, landmark bytes) per pool token on one GPU. KV heads are split over TP, replicated
    when TP exceeds them."""
    m = shape.model
    kv_heads = max(1, m.num_kv_heads // shape.tp)
    kv = 2 * m.num_layers * kv_heads * m.head_dim * KV_BYTES
    if shape.schedule is None:
        return float(kv), 0.0
    sparse_layers = m.num_layers - len([x for x in shape.schedule.dense_layers if x < m.num_layers])
    page = shape.schedule.geometry.page_size
    return float(kv), sparse_layers * kv_heads * m.head_dim * KV_BYTES / page


@dataclass(frozen=True)
class EngineMemory:
    terms: dict[str, float]  # bytes per GPU
    pool_tokens: int
    full_length_sequences: int  # longest requests the pool holds at once

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def engine_memory(shape: EngineShape, device_bytes: float) -> EngineMemory:
    weights = WEIGHT_BYTES * shape.model.params / shape.tp
    reserve = sglang_reserve_bytes(device_bytes, shape.tp)
    kv, landmark = kv_cell_bytes(shape)
    room = max(device_bytes - reserve - weights, 0.0)
    pool = int(room // (kv + landmark))
    if shape.kv_pool_tokens:
        pool = min(pool, shape.kv_pool_tokens)
    return EngineMemory(
        terms={
            "weights": weights,
            "kv_pool": pool * kv,
            "landmarks": pool * landmark,
            "runtime_reserve": reserve,
        },
        pool_tokens=pool,
        full_length_sequences=pool // max(shape.longest_sequence, 1),
    )
