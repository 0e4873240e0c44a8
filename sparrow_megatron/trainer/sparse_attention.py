"""The trainer's sparse forward (DistillSparse): Megatron core attention that, when asked, attends like
the sparse rollout did.

Every query position attends to exactly the pages the rollout's decode step at that position selected:
prompt positions dense (the prefill), response positions block top-k under the schedule's budget at
their total length, the schedule's dense layers dense. The rule and the per-position budgets come from
`sparsity.selection` / `sparsity.reference` (`position_budgets`); nothing is re-implemented here. On CPU
the teacher-forced torch reference computes it; on GPU the Triton kernel
`sparrow_kernels.block_sparse_attention` does (same rule, tested against the reference).

The core attention class of the layer spec is replaced by a subclass that behaves exactly like the base
class unless a `sparse_rows(...)` context is active, so one model serves the dense and the sparse
forward and the parameter names (checkpoints, HF export) do not change.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sparrow_megatron.sparsity.reference import position_budgets, sparse_causal_attention_reference
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY, PageGeometry


@dataclass(frozen=True)
class SparseRow:
    """How one row of a micro-batch attended during rollout."""

    budgets: tuple[int | None, ...]  # per query position (None = dense); shorter than the row = dense tail
    geometry: PageGeometry = DEFAULT_GEOMETRY
    dense_layers: tuple[int, ...] = ()  # global 0-based layer ids

    @classmethod
    def from_schedule(cls, schedule: Schedule | None, prompt_len: int, seq_len: int) -> SparseRow:
        if schedule is None:
            return cls(budgets=(None,) * seq_len)
        return cls(
            budgets=tuple(position_budgets(schedule, prompt_len, seq_len)),
            geometry=schedule.geometry,
            dense_layers=tuple(schedule.dense_layers),
        )

    @functools.cached_property
    def all_dense(self) -> bool:
        return all(b is None for b in self.budgets)

    @functools.cached_property
    def _budget_cpu(self) -> torch.Tensor:
        return torch.tensor([-1 if b is None else b for b in self.budgets], dtype=torch.int64)

    def budget_tensor(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """The per-position budgets as int64 [seq_len] on `device`, -1 = dense; converted once per row,
        not once per layer (each layer's forward and its recompute read it)."""
        b = self._budget_cpu[:seq_len]
        if len(b) < seq_len:
            b = torch.cat([b, b.new_full((seq_len - len(b),), -1)])
        return b.to(device, non_blocking=True)

    def is_dense_in(self, layer_id: int) -> bool:
        return layer_id in self.dense_layers or self.all_dense


_ACTIVE: list[Sequence[SparseRow]] = []


@contextlib.contextmanager
def sparse_rows(rows: Sequence[SparseRow] | None) -> Iterator[None]:
    """Run the forwards inside with sparse attention, one SparseRow per micro-batch row (None = dense)."""
    if rows is None:
        yield
        return
    _ACTIVE.append(rows)
    try:
        yield
    finally:
        _ACTIVE.pop()


def _kernel():
    try:
        from sparrow_kernels.training_attention import block_sparse_attention
    except ImportError:  # no Triton / no GPU build: the reference serves
        return None
    return block_sparse_attention


def sequence_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: SparseRow, scale: float
) -> torch.Tensor:
    """One sequence, q [T, Hq, D], k/v [T, Hkv, D] post-RoPE -> [T, Hq, D]."""
    seq_len = q.shape[0]
    kernel = _kernel() if q.is_cuda else None
    if kernel is not None:
        return kernel(q, k, v, row.budget_tensor(seq_len, q.device), geometry=row.geometry, scale=scale)
    budgets = list(row.budgets[:seq_len]) + [None] * max(0, seq_len - len(row.budgets))
    out, _ = sparse_causal_attention_reference(q, k, v, budgets, geometry=row.geometry, scale=scale)
    return out


def _sparse_core_forward(query, key, value, rows: Sequence[SparseRow], layer_id: int, scale: float):
    """Megatron layout: query [s, b, np, hn], key/value [s, b, ng, hn] -> [s, b, np * hn]."""
    seq_len, batch = query.shape[:2]
    if len(rows) != batch:
        raise ValueError(f"sparse forward: {len(rows)} SparseRows for a micro-batch of {batch} rows")
    outs = []
    for b, row in enumerate(rows):
        q, k, v = query[:, b], key[:, b], value[:, b]
        if row.is_dense_in(layer_id):
            row = SparseRow(budgets=(), geometry=row.geometry)
        outs.append(sequence_sparse_attention(q, k, v, row, scale))
    return torch.stack(outs, dim=1).reshape(seq_len, batch, -1)


@functools.cache
def sparse_capable(base: type) -> type:
    """A subclass of a Megatron core-attention class that goes sparse inside `sparse_rows`."""

    class SparseCapableAttention(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sparrow_layer_id = int(kwargs.get("layer_number", 1)) - 1  # global, 0-based

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            if not _ACTIVE:
                return super().forward(query, key, value, attention_mask, *args, **kwargs)
            if kwargs.get("packed_seq_params") is not None:
                raise NotImplementedError("sparse forward: packed (THD) sequences are not supported")
            rows = _ACTIVE[-1]
            if all(row.is_dense_in(self.sparrow_layer_id) for row in rows):  # dense layer: the base path
                return super().forward(query, key, value, attention_mask, *args, **kwargs)
            scale = getattr(self, "softmax_scale", None) or query.shape[-1] ** -0.5
            return _sparse_core_forward(query, key, value, rows, self.sparrow_layer_id, scale)

    SparseCapableAttention.__name__ = SparseCapableAttention.__qualname__ = f"SparseCapable{base.__name__}"
    return SparseCapableAttention


def with_sparse_attention(spec):
    """A copy of a GPT layer spec whose core attention is `sparse_capable` (dense until asked)."""
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention.submodules
    core = attn.core_attention
    if hasattr(core, "module"):  # a ModuleSpec
        core.module = sparse_capable(core.module)
    else:
        attn.core_attention = sparse_capable(core)
    return spec
