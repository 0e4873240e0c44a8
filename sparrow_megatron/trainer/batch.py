"""The rollout batch the trainer consumes, and its packing into token-budget micro-batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sparrow_megatron.errors import UserError


@dataclass
class RolloutBatch:
    """One sample per entry; variable prompt and response lengths.

    rollout_logprobs: log-probs of the sampled response tokens under the rollout engine.
    advantages: one value per sample (see grpo.group_advantages), broadcast to its tokens.
    response_masks: optional 0/1 per response token (0 = excluded from the loss, e.g. a tool output).
    old_logprobs / ref_logprobs: dense recomputed and reference log-probs; filled by the trainer/loop.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    response_masks: list[list[int]] | None = None
    old_logprobs: list[torch.Tensor] | None = None
    ref_logprobs: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def validate(self, vocab_size: int, need_training_fields: bool) -> None:
        n = len(self.prompt_ids)
        if len(self.response_ids) != n:
            raise UserError(f"RolloutBatch: {n} prompts but {len(self.response_ids)} responses")
        for i, (p, r) in enumerate(zip(self.prompt_ids, self.response_ids, strict=True)):
            if len(p) == 0 or len(r) == 0:
                raise UserError(f"RolloutBatch: sample {i} has an empty prompt or response")
            for name, ids in (("prompt_ids", p), ("response_ids", r)):
                if min(ids) < 0 or max(ids) >= vocab_size:
                    raise UserError(
                        f"RolloutBatch: sample {i} field '{name}' has a token id outside [0, {vocab_size})"
                    )
        if not need_training_fields:
            return
        if len(self.advantages) != n:
            raise UserError(f"RolloutBatch: {n} samples but {len(self.advantages)} advantages")
        if len(self.rollout_logprobs) != n:
            raise UserError(
                f"RolloutBatch: {n} samples but {len(self.rollout_logprobs)} rollout_logprobs rows"
            )
        for i, (r, lp) in enumerate(zip(self.response_ids, self.rollout_logprobs, strict=True)):
            if len(lp) != len(r):
                raise UserError(
                    f"RolloutBatch: sample {i} has {len(r)} response tokens but {len(lp)} rollout_logprobs"
                )
            t = torch.as_tensor(lp, dtype=torch.float64)
            if not torch.isfinite(t).all():
                j = int((~torch.isfinite(t)).nonzero()[0])
                raise UserError(
                    f"RolloutBatch: sample {i} field 'rollout_logprobs' token {j} is {float(t[j])}"
                )
        for name in ("old_logprobs", "ref_logprobs"):
            rows = getattr(self, name)
            if rows is None:
                continue
            if len(rows) != n:
                raise UserError(f"RolloutBatch: {n} samples but {len(rows)} rows of {name}")
            for i, (r, lp) in enumerate(zip(self.response_ids, rows, strict=True)):
                if len(lp) != len(r):
                    raise UserError(
                        f"RolloutBatch: sample {i} field '{name}' has {len(lp)} entries, want {len(r)}"
                    )
        if self.response_masks is not None:
            for i, (r, m) in enumerate(zip(self.response_ids, self.response_masks, strict=True)):
                if len(m) != len(r):
                    raise UserError(
                        f"RolloutBatch: sample {i} response_masks has {len(m)} entries, want {len(r)}"
                    )

    def shard(self, rank: int, world: int) -> list[int]:
        """Indices of the samples this DP rank takes (round-robin keeps long/short mixes balanced)."""
        return list(range(rank, len(self), world))


def pack_micro_batches(lengths: Sequence[int], token_budget: int, min_count: int = 1) -> list[list[int]]:
    """Group sample indices into micro-batches whose padded size (rows x longest) fits token_budget.

    First-fit over samples sorted by length (longest first), then rebalanced to `max(count, min_count)`
    bins with greedy longest-processing-time so every DP rank can run the same number of micro-batches.
    A sample longer than the budget gets a micro-batch of its own.
    """
    if not lengths:
        return [[] for _ in range(min_count)]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    for i in order:
        for b in bins:
            longest = max(lengths[j] for j in b)
            if max(longest, lengths[i]) * (len(b) + 1) <= token_budget:
                b.append(i)
                break
        else:
            bins.append([i])
    count = max(len(bins), min_count)
    # Balanced: assign longest-first to the bin with the fewest padded tokens so far.
    balanced: list[list[int]] = [[] for _ in range(count)]
    for i in order:
        target = min(range(count), key=lambda k: (_padded(lengths, balanced[k] + [i]), k))
        balanced[target].append(i)
    if all(_padded(lengths, b) <= token_budget or len(b) == 1 for b in balanced):
        return [sorted(b) for b in balanced]
    return [sorted(b) for b in bins] + [[] for _ in range(count - len(bins))]


def _padded(lengths: Sequence[int], ids: list[int]) -> int:
    return max(lengths[j] for j in ids) * len(ids) if ids else 0


@dataclass
class MicroBatch:
    """Right-padded [rows, seq] tokens; response tokens are predicted at positions start-1 .. end-2."""

    sample_ids: list[int]
    tokens: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s]
    target_positions: list[torch.Tensor]  # per row: positions whose next-token logit scores a response token
    targets: list[torch.Tensor]  # per row: the response token ids

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def build_micro_batch(
    batch: RolloutBatch, sample_ids: list[int], pad_id: int = 0, pad_to: int = 1
) -> MicroBatch:
    seqs = [list(batch.prompt_ids[i]) + list(batch.response_ids[i]) for i in sample_ids]
    if not seqs:
        # An empty micro-batch keeps the count equal across DP ranks: one pad token, nothing scored.
        one = torch.zeros((1, pad_to), dtype=torch.long)
        return MicroBatch([], one, torch.arange(pad_to).unsqueeze(0), [], [])
    # Causal attention + right padding: pad tokens only follow real ones, so they never change them.
    s = max(len(x) for x in seqs)
    s = int(math.ceil(s / pad_to) * pad_to)
    tokens = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    positions, targets = [], []
    for row, (i, seq) in enumerate(zip(sample_ids, seqs, strict=True)):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        p = len(batch.prompt_ids[i])
        r = len(batch.response_ids[i])
        positions.append(torch.arange(p - 1, p + r - 1))
        targets.append(torch.tensor(batch.response_ids[i], dtype=torch.long))
    position_ids = torch.arange(s).unsqueeze(0).expand(len(seqs), s).contiguous()
    return MicroBatch(sample_ids, tokens, position_ids, positions, targets)
