"""What goes into a rollout request and what comes back per sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sparrow_megatron.sparsity.acceptance import PAD_ID


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Base sampling seed: sample j of prompt i draws with seed + i * n + j (SGLang's sampling_seed), so
    # a rerun (a resumed job) samples the same tokens.
    seed: int | None = None

    def to_sglang(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "ignore_eos": self.ignore_eos,
        }
        if self.stop:
            params["stop"] = list(self.stop)
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            params["sampling_seed"] = self.seed
        return params


@dataclass
class Sample:
    """One generated continuation with everything the loop needs downstream."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the engine's (sparse) distribution
    top_ids: list[list[int]]  # per output token, the engine's top-K ids (K = top_logprobs)
    top_logprobs: list[list[float]]
    finish_reason: str  # "stop" | "length" | ...
    engine_id: int
    weight_version: int | None
    schedule: str | None  # None: dense
    adapter: str | None
    latency_s: float
    attempts: int = 1
    matched_stop: Any = None

    @property
    def response_len(self) -> int:
        return len(self.output_ids)


@dataclass
class EngineStats:
    """Throughput of one engine over one generate call."""

    engine_id: int
    url: str
    requests: int = 0
    output_tokens: int = 0
    first_start: float | None = None
    last_end: float | None = None
    failures: int = 0

    @property
    def wall_s(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class GenerationResult:
    """samples[i][j]: sample j of prompt i."""

    samples: list[list[Sample]]
    engine_stats: dict[int, EngineStats] = field(default_factory=dict)
    wall_s: float = 0.0
    # Samples whose engine reported a weight version other than the fleet's (should stay 0).
    stale_samples: int = 0

    def flat(self) -> list[Sample]:
        return [s for group in self.samples for s in group]

    @property
    def output_tokens(self) -> int:
        return sum(s.response_len for s in self.flat())

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class ScoredTokens:
    """Teacher-forced log-probs of given response tokens (e.g. the dense policy on a sparse rollout)."""

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    engine_id: int
    weight_version: int | None

    @property
    def response_len(self) -> int:
        return len(self.output_ids)

    def topk_tensors(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_tensors(self, k)


def topk_tensors(sample: Sample | ScoredTokens, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] ids and log-probs of one sample, padded with id -1 / -inf (acceptance_from_topk's pad)."""
    k = k or max((len(row) for row in sample.top_ids), default=0)
    ids = torch.full((sample.response_len, k), PAD_ID, dtype=torch.long)
    lps = torch.full((sample.response_len, k), float("-inf"), dtype=torch.float64)
    for t, (row_ids, row_lps) in enumerate(zip(sample.top_ids, sample.top_logprobs, strict=True)):
        n = min(k, len(row_ids))
        ids[t, :n] = torch.tensor(row_ids[:n], dtype=torch.long)
        lps[t, :n] = torch.tensor(row_lps[:n], dtype=torch.float64)
    return ids, lps
