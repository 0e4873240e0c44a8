"""Rollout cost model in effective FLOPs (eFLOPs = FLOPs + I * bytes, I = peak FLOP/s / HBM bandwidth).

Decode is memory-bound, so the bytes each step must read dominate; weighting bytes by I puts compute
and memory on one scale. The formula is written out, with where it departs from the paper, in
docs/cost_model.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import Schedule


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool

    @property
    def layer_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size + 2 * self.head_dim
        return attn + mlp + norms

    @property
    def params(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.layer_params + embed + self.hidden_size

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token (the embedding lookup is not a matmul; the LM head is)."""
        return self.num_layers * self.layer_params + self.vocab_size * self.hidden_size

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelShape:
        from sparrow_megatron.models.config import read_hf_config

        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        cfg = read_hf_config(path)
        required = [
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        ]
        for key in required:
            if not isinstance(cfg.get(key), int):
                raise UserError(f"{path}: field '{key}' is missing or not an integer")
        heads = cfg["num_attention_heads"]
        return cls(
            name=cfg.get("_name_or_path") or path.parent.name,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def _qwen3(name, layers, hidden, heads, inter, tied) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, 8, 128, inter, 151936, tied)


# From the public Qwen3 config.json files (all: 8 KV heads, head_dim 128, vocab 151936).
MODELS = {
    "qwen3-0.6b": _qwen3("Qwen3-0.6B", 28, 1024, 16, 3072, True),
    "qwen3-1.7b": _qwen3("Qwen3-1.7B", 28, 2048, 16, 6144, True),
    "qwen3-4b": _qwen3("Qwen3-4B", 36, 2560, 32, 9728, True),
    "qwen3-8b": _qwen3("Qwen3-8B", 36, 4096, 32, 12288, False),
    "qwen3-14b": _qwen3("Qwen3-14B", 40, 5120, 40, 17408, False),
    "qwen3-32b": _qwen3("Qwen3-32B", 64, 5120, 64, 25600, False),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_flops: float  # dense bf16 tensor-core FLOP/s
    hbm_bandwidth: float  # bytes/s

    @property
    def intensity(self) -> float:
        """I = FLOPs per byte at the roofline ridge: the weight of one byte read in eFLOPs."""
        return self.bf16_flops / self.hbm_bandwidth


# Vendors' datasheets (SXM parts, dense, no structured sparsity).
HARDWARE = {
    "h100": Hardware("H100 SXM", 989.4e12, 3.35e12),
    "h200": Hardware("H200 SXM", 989.4e12, 4.8e12),
    "b200": Hardware("B200", 2.25e15, 8.0e12),
}


def resolve_model(spec: str) -> ModelShape:
    key = spec.lower()
    if key in MODELS:
        return MODELS[key]
    path = Path(spec)
    if path.exists():
        return ModelShape.from_hf_config(path)
    raise UserError(f"unknown model '{spec}': not one of {', '.join(MODELS)} nor a config.json path")


def resolve_hardware(spec: str) -> Hardware:
    if spec.lower() not in HARDWARE:
        raise UserError(f"unknown hardware '{spec}': choose one of {', '.join(HARDWARE)}")
    return HARDWARE[spec.lower()]


@dataclass(frozen=True)
class CostModel:
    model: ModelShape
    hardware: Hardware
    batch: int = 64  # sequences decoded together: the parameter reads are shared by them
    kv_bytes: int = 2  # bf16 KV cache
    weight_bytes: int = 2

    def _attention(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(FLOPs, bytes) of one dense attention layer for one query token over `context` keys."""
        m = self.model
        flops = 4.0 * m.num_heads * m.head_dim * context
        nbytes = 2.0 * m.num_kv_heads * m.head_dim * context * self.kv_bytes
        return flops, nbytes

    def _parameters(self) -> float:
        """eFLOPs of the non-attention work of one decode token: matmuls + amortized weight reads."""
        return 2.0 * self.model.matmul_params + self.hardware.intensity * (
            self.model.params * self.weight_bytes / self.batch
        )

    def decode_step_cost(self, context: np.ndarray, schedule: Schedule | None) -> np.ndarray:
        """eFLOPs of one sequence's decode step per KV length in `context` (all layers)."""
        m, intensity = self.model, self.hardware.intensity
        context = np.asarray(context, dtype=np.float64)
        dense_flops, dense_bytes = self._attention(context)
        dense = dense_flops + intensity * dense_bytes
        if schedule is None:
            return m.num_layers * dense + self._parameters()
        page = schedule.geometry.page_size
        budgets = np.array([schedule.budget_at(int(c)) or math.inf for c in context])
        kept = np.minimum(budgets, context)
        pages = np.ceil(context / page)
        score_flops = 2.0 * m.num_kv_heads * m.head_dim * pages
        # landmarks read once, fp32 scores written and read back by the top-k
        score_bytes = m.num_kv_heads * m.head_dim * pages * self.kv_bytes + 8.0 * m.num_kv_heads * pages
        attn_flops, attn_bytes = self._attention(kept)
        sparse = np.where(
            context > budgets,
            score_flops + attn_flops + intensity * (score_bytes + attn_bytes),
            dense,
        )
        num_dense = len([layer for layer in schedule.dense_layers if layer < m.num_layers])
        return num_dense * dense + (m.num_layers - num_dense) * sparse + self._parameters()

    def attention_bytes(self, context: np.ndarray, schedule: Schedule | None) -> np.ndarray:
        """KV bytes one sparse layer reads per decode step (landmarks + selected K/V; all K/V if dense)."""
        m = self.model
        context = np.asarray(context, dtype=np.float64)
        per_token = 2.0 * m.num_kv_heads * m.head_dim * self.kv_bytes
        if schedule is None:
            return context * per_token
        budgets = np.array([schedule.budget_at(int(c)) or math.inf for c in context])
        pages = np.ceil(context / schedule.geometry.page_size)
        sparse = np.minimum(budgets, context) * per_token + pages * per_token / 2
        return np.where(context > budgets, sparse, context * per_token)

    def kv_bytes_ratio(self, prompt_len: int, gen_len: int, schedule: Schedule) -> float:
        """Dense over sparse KV bytes read across a generation: the ceiling of the attention speedup."""
        context = prompt_len + np.arange(1, max(gen_len, 2))
        return float(
            self.attention_bytes(context, None).sum() / self.attention_bytes(context, schedule).sum()
        )

    def prefill_cost(self, prompt_len: int) -> float:
        """eFLOPs of the (dense, compute-bound) prefill of one prompt; the same for dense and sparse."""
        m = self.model
        causal_attention = 2.0 * m.num_heads * m.head_dim * prompt_len * prompt_len
        return 2.0 * m.matmul_params * prompt_len + m.num_layers * causal_attention

    def generation_cost(
        self, prompt_len: int, gen_len: int, samples: int, schedule: Schedule | None
    ) -> float:
        """eFLOPs to generate `samples` responses of gen_len tokens after one shared prompt."""
        # The first token comes from the prefill's logits; decode step t sees prompt_len + t tokens.
        context = prompt_len + np.arange(1, gen_len)
        decode = float(self.decode_step_cost(context, schedule).sum()) if gen_len > 1 else 0.0
        return self.prefill_cost(prompt_len) + samples * decode


@dataclass
class SpeedupPrediction:
    model: str
    hardware: str
    schedule: str
    prompt_len: int
    gen_lens: list[int]
    samples: int
    batch: int
    dense_cost: float
    sparse_cost: float
    predicted_speedup: float
    kv_bytes_ratio: float  # dense KV bytes read / sparse (scoring + selected KV) bytes read

    def to_dict(self) -> dict:
        return asdict(self)


def predict_speedup(
    model: ModelShape,
    hardware: Hardware,
    schedule: Schedule,
    prompt_len: int,
    gen_lens: int | Sequence[int],
    samples: int = 1,
    batch: int = 64,
) -> SpeedupPrediction:
    """Predicted rollout speedup of `schedule` over dense for one or a distribution of lengths."""
    lens = [gen_lens] if isinstance(gen_lens, int) else list(gen_lens)
    if not lens or min(lens) < 1 or prompt_len < 1 or samples < 1 or batch < 1:
        raise UserError("prompt length, generation lengths, samples and batch must be positive")
    cm = CostModel(model, hardware, batch=batch)
    dense = sum(cm.generation_cost(prompt_len, n, samples, None) for n in lens) / len(lens)
    sparse = sum(cm.generation_cost(prompt_len, n, samples, schedule) for n in lens) / len(lens)
    ratio = cm.kv_bytes_ratio(prompt_len, max(lens), schedule)
    return SpeedupPrediction(
        model=model.name,
        hardware=hardware.name,
        schedule=schedule.name,
        prompt_len=prompt_len,
        gen_lens=lens,
        samples=samples,
        batch=batch,
        dense_cost=dense,
        sparse_cost=sparse,
        predicted_speedup=dense / sparse,
        kv_bytes_ratio=ratio,
    )


def page_size_search(
    model: ModelShape,
    hardware: Hardware,
    schedule: Schedule,
    prompt_len: int,
    gen_len: int,
    page_sizes: Sequence[int] = (8, 16, 32, 64, 128),
    batch: int = 64,
) -> list[dict]:
    """Predicted cost per page size, budgets rounded up to whole pages of each size.

    Only the cost side: smaller pages select more precisely but read more landmarks; whether a page
    size keeps p5 >= tau has to be measured (calibration).
    """
    rows = []
    for page in page_sizes:
        budgets = tuple(None if b is None else max(-(-b // page) * page, 3 * page) for b in schedule.budgets)
        geometry = type(schedule.geometry)(page, schedule.geometry.sink_pages, schedule.geometry.local_pages)
        variant = Schedule(
            budgets, schedule.bin_width, geometry, schedule.dense_layers, f"{schedule.name}@P{page}"
        )
        pred = predict_speedup(model, hardware, variant, prompt_len, gen_len, batch=batch)
        rows.append(
            {"page_size": page, "sparse_cost": pred.sparse_cost, "predicted_speedup": pred.predicted_speedup}
        )
    return rows
