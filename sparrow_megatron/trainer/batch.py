"""The rollout batch the trainer consumes, and its packing into token-budget micro-batches."""

from __future__ import annotations

import heapq
import itertools
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
    group_ids: optional GRPO group of each sample; mini-batches (grpo.mini_batches) keep a group together.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    response_masks: list[list[int]] | None = None
    old_logprobs: list[torch.Tensor] | None = None
    ref_logprobs: list[torch.Tensor] | None = None
    group_ids: list | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, ids: Sequence[int]) -> RolloutBatch:
        """The samples `ids`, in that order, with every per-sample field that is set."""

        def pick(rows):
            return None if rows is None else [rows[i] for i in ids]

        return RolloutBatch(
            prompt_ids=[self.prompt_ids[i] for i in ids],
            response_ids=[self.response_ids[i] for i in ids],
            rollout_logprobs=pick(self.rollout_logprobs) if self.rollout_logprobs else [],
            advantages=pick(self.advantages) if self.advantages else [],
            response_masks=pick(self.response_masks),
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            group_ids=pick(self.group_ids),
        )

    def validate(self, vocab_size: int, need_training_fields: bool) -> None:
        n = len(self.prompt_ids)
        if len(self.response_ids) != n:
            raise UserError(f"RolloutBatch: {n} prompts but {len(self.response_ids)} responses")
        if self.group_ids is not None and len(self.group_ids) != n:
            raise UserError(f"RolloutBatch: {n} samples but {len(self.group_ids)} group_ids")
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


def balanced_shards(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Split sample indices over `world` DP ranks with near-equal token totals.

    Greedy largest-first onto the rank with the fewest tokens so far (LPT: within 4/3 of the optimal
    makespan), ties to the rank with fewer samples, then the lower rank; deterministic, so every rank
    computes the same split without communication. Round-robin by count would put a 37K- and a
    2K-token response on the same footing.
    """
    heap = [(0, 0, r) for r in range(world)]
    shards: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, count, r = heapq.heappop(heap)
        shards[r].append(i)
        heapq.heappush(heap, (tokens + lengths[i], count + 1, r))
    return [sorted(s) for s in shards]


def split_mini_batches(group_ids: Sequence, count: int) -> list[list[int]]:
    """Sample indices of `count` mini-batches (grpo.mini_batches) that keep every GRPO group whole.

    Groups in order of first appearance, dealt out contiguously with near-equal group counts (the first
    len(groups) % count mini-batches take one more), as verl splits a rollout batch into PPO mini-batches.
    Fewer groups than `count` gives one mini-batch per group: a group is never split. Token balance
    across DP ranks happens inside each mini-batch (`balanced_shards`).
    """
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    members = list(groups.values())
    k = max(1, min(count, len(members)))
    size, extra = divmod(len(members), k)
    out, start = [], 0
    for j in range(k):
        end = start + size + (1 if j < extra else 0)
        out.append(sorted(i for m in members[start:end] for i in m))
        start = end
    return out if members else [[]]


def micro_batch_cost(lengths: Sequence[int], ids: Sequence[int], packed: bool) -> int:
    """Tokens a micro-batch occupies: the sum when packed (THD), rows x longest when right-padded."""
    if not ids:
        return 0
    return sum(lengths[j] for j in ids) if packed else max(lengths[j] for j in ids) * len(ids)


def pack_micro_batches(
    lengths: Sequence[int], token_budget: int, min_count: int = 1, packed: bool = False
) -> list[list[int]]:
    """Group sample indices into micro-batches whose cost (`micro_batch_cost`) fits token_budget.

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
            if micro_batch_cost(lengths, b + [i], packed) <= token_budget:
                b.append(i)
                break
        else:
            bins.append([i])
    count = max(len(bins), min_count)
    # Balanced: assign longest-first to the bin with the lowest cost so far.
    balanced: list[list[int]] = [[] for _ in range(count)]
    for i in order:
        target = min(range(count), key=lambda k: (micro_batch_cost(lengths, balanced[k] + [i], packed), k))
        balanced[target].append(i)
    if all(micro_batch_cost(lengths, b, packed) <= token_budget or len(b) == 1 for b in balanced):
        return [sorted(b) for b in balanced]
    return [sorted(b) for b in bins] + [[] for _ in range(count - len(bins))]


@dataclass
class MicroBatch:
    """Tokens [rows, seq]: right-padded rows, or one packed (THD) row of back-to-back samples.

    Sample j's response tokens are predicted at `target_positions[j]` of row `rows[j]` (its positions
    start-1 .. end-2). Packed: `cu_seqlens` [n+1] int32 bounds each sample (and a trailing pad segment)
    inside row 0; positions restart at 0 per sample.
    """

    sample_ids: list[int]
    tokens: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s]
    # per sample: the positions whose next-token logit scores a response token
    target_positions: list[torch.Tensor]
    targets: list[torch.Tensor]  # per sample: the response token ids
    rows: list[int] = field(default_factory=list)  # per sample: its row
    cu_seqlens: torch.Tensor | None = None  # packed only
    max_seqlen: int = 0  # packed only
    # packed with per-sample padding (context parallelism): samples start at these bounds, while
    # cu_seqlens holds the true lengths' cumulative sums (Transformer Engine's THD convention)
    cu_seqlens_padded: torch.Tensor | None = None
    # a CP rank's view (`context_parallel.local_micro_batch`): per sample, the indices of its response
    # tokens scored on this rank (target_positions / targets hold those only); None = all of them
    target_subset: list[torch.Tensor] | None = None

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def flat_target_index(self) -> torch.Tensor:
        """Indices into the [b * s] flattened logits of every scored position, sample after sample."""
        if not self.target_positions:
            return torch.zeros(0, dtype=torch.long)
        rows = self.rows or list(range(len(self.target_positions)))
        return torch.cat([r * self.seq_len + p for r, p in zip(rows, self.target_positions, strict=True)])


def _targets(batch: RolloutBatch, i: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    p, r = len(batch.prompt_ids[i]), len(batch.response_ids[i])
    return torch.arange(offset + p - 1, offset + p + r - 1), torch.tensor(
        batch.response_ids[i], dtype=torch.long
    )


def build_micro_batch(
    batch: RolloutBatch,
    sample_ids: list[int],
    pad_id: int = 0,
    pad_to: int = 1,
    packed: bool = False,
    seq_multiple: int = 1,
) -> MicroBatch:
    """pad_to: the sequence length (packed: the total) is rounded up to a multiple (SP needs TP).
    seq_multiple > 1 (packed only): each sample padded to a multiple of it (context parallelism)."""
    if packed and seq_multiple > 1:
        return _padded_packed_micro_batch(batch, sample_ids, pad_id, seq_multiple)
    if packed:
        return _packed_micro_batch(batch, sample_ids, pad_id, pad_to)
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
        pos, tgt = _targets(batch, i, 0)
        positions.append(pos)
        targets.append(tgt)
    position_ids = torch.arange(s).unsqueeze(0).expand(len(seqs), s).contiguous()
    return MicroBatch(sample_ids, tokens, position_ids, positions, targets, rows=list(range(len(seqs))))


def _packed_micro_batch(batch: RolloutBatch, sample_ids: list[int], pad_id: int, pad_to: int) -> MicroBatch:
    seqs = [list(batch.prompt_ids[i]) + list(batch.response_ids[i]) for i in sample_ids]
    lengths = [len(x) for x in seqs]
    used = sum(lengths)
    total = max(int(math.ceil(used / pad_to) * pad_to), pad_to)
    # The round-up pad is its own segment: attention never mixes it with a sample.
    bounds = [0, *itertools.accumulate(lengths)] + ([total] if total > used else [])
    tokens = torch.full((1, total), pad_id, dtype=torch.long)
    tokens[0, :used] = torch.tensor([t for x in seqs for t in x], dtype=torch.long)
    position_ids = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    positions, targets = [], []
    for i, offset in zip(sample_ids, bounds, strict=False):
        pos, tgt = _targets(batch, i, offset)
        positions.append(pos)
        targets.append(tgt)
    segment = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return MicroBatch(
        sample_ids, tokens, position_ids.unsqueeze(0), positions, targets, rows=[0] * len(sample_ids),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=max(segment),
    )  # fmt: skip


def _padded_packed_micro_batch(
    batch: RolloutBatch, sample_ids: list[int], pad_id: int, multiple: int
) -> MicroBatch:
    """Packed, each sample padded to a multiple of `multiple` (its pad tokens follow it: causal)."""
    seqs = [list(batch.prompt_ids[i]) + list(batch.response_ids[i]) for i in sample_ids] or [[pad_id]]
    lengths = [len(x) for x in seqs]
    padded = [int(math.ceil(n / multiple) * multiple) for n in lengths]
    bounds = [0, *itertools.accumulate(padded)]
    tokens = torch.full((1, bounds[-1]), pad_id, dtype=torch.long)
    position_ids = torch.cat([torch.arange(n) for n in padded]).unsqueeze(0)
    positions, targets = [], []
    for i, seq, offset in zip(sample_ids, seqs, bounds, strict=False):
        tokens[0, offset : offset + len(seq)] = torch.tensor(seq, dtype=torch.long)
        pos, tgt = _targets(batch, i, offset)
        positions.append(pos)
        targets.append(tgt)
    return MicroBatch(
        sample_ids, tokens, position_ids, positions, targets, rows=[0] * len(sample_ids),
        cu_seqlens=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), max_seqlen=max(padded),
        cu_seqlens_padded=torch.tensor(bounds, dtype=torch.int32),
    )  # fmt: skip
