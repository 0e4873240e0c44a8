"""The decode step's page plan, built once per step in the attention metadata step and read by every layer.

The rule (`sparrow_megatron.sparsity.selection.plan_pages`) decides per request, from its schedule and
length, whether the step is sparse and how many pages it keeps; that depends on neither the layer nor
the scores, so it is computed here once, as device tensors, and every sparse layer reuses it:

- `budget [B]` int64: the request's token budget when its step is sparse, 0 when dense (no schedule,
  or the cache still fits the budget). Budgets are data, never shapes, so one CUDA graph per batch
  size serves every schedule.
- `seq_lens`, `num_pages`, `cand_start` / `cand_end` (candidate pages; the sink and local pages lie
  outside), `top_k` (pages chosen by score), `num_selected` (budget / P), all [B]; 0 for dense rows
  except seq_lens and num_pages. The page geometry is data too.
- `layer_sparse [num_layers, B]` bool: the row is sparse at that layer (its schedule's dense layers
  excluded).
- `phys_pages [B, max_pages]` int64: physical KV page of each logical page (`req_to_token[row, p * P]
  // P`; the server runs with page size P, so a logical page is one physical page). Landmarks and KV are
  read through it: no per-request copies.
- `fill_page [B]` int64: the physical page the new token just completed (-1 when none), for the
  landmark update of every layer.

Host side (`build_host`, then `copy_host`): schedules and host lengths -> the plan table, outside the
graph (or in eager mode), once per step. Device side (`fill_pages`): static-shape tensor ops only, so
it can be recorded in a CUDA graph and replays with the runner's static req_pool_indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY, PageGeometry, plan_pages


@dataclass
class HostPlan:
    """What the host decides for a step (see the module docstring), before any layer runs."""

    table: (
        torch.Tensor
    )  # [7, B] int64 CPU: budget, seq_len, num_pages, cand_end, top_k, num_selected, cand_start
    layer_sparse: torch.Tensor  # [num_layers, B] bool, CPU
    geometry: PageGeometry
    any_sparse: bool
    max_selected: int  # most pages a sparse row keeps this step (0 when none)
    max_top_k: int
    max_len: int
    # layer id -> (sparse rows, dense rows, dense rows on the host) as index tensors; filled once per
    # step, shared by layers with the same split (the eager torch path indexes with them).
    splits: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def build_host(
    schedules: list[Schedule | None],
    seq_lens: list[int],
    num_layers: int,
    device: torch.device | str = "cpu",
) -> HostPlan:
    """The host plan of a step. Rows past len(schedules) (graph padding) are dense."""
    num_rows = len(seq_lens)
    table = torch.zeros(7, num_rows, dtype=torch.int64)
    layer_sparse = torch.zeros(num_layers, num_rows, dtype=torch.bool)
    geometry = None
    first_name = None
    for row, schedule in enumerate(schedules[:num_rows]):
        if schedule is None:
            continue
        total_len = int(seq_lens[row])
        budget = schedule.budget_at(total_len)
        if budget is None:
            continue
        plan = plan_pages(total_len, budget, schedule.geometry)
        if plan.dense:
            continue
        if geometry is None:
            geometry, first_name = schedule.geometry, schedule.name
        elif schedule.geometry != geometry:
            raise UserError(
                f"sparse decode batch mixes page geometries: schedule {first_name!r} has {geometry}, "
                f"schedule {schedule.name!r} (batch row {row}) has {schedule.geometry}"
            )
        table[:, row] = torch.tensor(
            [
                budget,
                total_len,
                plan.num_pages,
                plan.candidate_end,
                plan.top_k,
                plan.num_selected,
                plan.candidate_start,
            ]
        )
        layer_sparse[:, row] = True
        dense = [lid for lid in schedule.dense_layers if lid < num_layers]
        if dense:
            layer_sparse[dense, row] = False
    geometry = geometry or DEFAULT_GEOMETRY
    P = geometry.page_size
    lens = torch.as_tensor([int(n) for n in seq_lens], dtype=torch.int64)
    table[1] = lens
    table[2] = (lens + P - 1) // P
    any_sparse = bool((table[0] > 0).any())
    host = HostPlan(
        table=table,
        layer_sparse=layer_sparse,
        geometry=geometry,
        any_sparse=any_sparse,
        max_selected=int(table[5].max()) if num_rows else 0,
        max_top_k=int(table[4].max()) if num_rows else 0,
        max_len=int(lens.max()) if num_rows else 0,
    )
    if any_sparse:
        by_mask: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer_id in range(num_layers):
            mask = layer_sparse[layer_id]
            key = mask.numpy().tobytes()
            if key not in by_mask:
                dense_cpu = (~mask).nonzero().flatten()
                by_mask[key] = (mask.nonzero().flatten().to(device), dense_cpu.to(device), dense_cpu)
            host.splits[layer_id] = by_mask[key]
    return host


@dataclass
class DevicePlan:
    """The per-step tensors every layer reads (see the module docstring). Static buffers in graph mode."""

    table: torch.Tensor  # [7, B] int64, rows as in HostPlan.table
    layer_sparse: torch.Tensor  # [num_layers, B] bool
    phys_pages: torch.Tensor  # [B, W] int64
    fill_page: torch.Tensor  # [B] int64

    budget = property(lambda self: self.table[0])
    seq_lens = property(lambda self: self.table[1])
    num_pages = property(lambda self: self.table[2])
    cand_end = property(lambda self: self.table[3])
    top_k = property(lambda self: self.table[4])
    num_selected = property(lambda self: self.table[5])
    cand_start = property(lambda self: self.table[6])

    @classmethod
    def empty(cls, max_bs: int, num_layers: int, max_pages: int, device) -> DevicePlan:
        return cls(
            table=torch.zeros(7, max_bs, dtype=torch.int64, device=device),
            layer_sparse=torch.zeros(num_layers, max_bs, dtype=torch.bool, device=device),
            phys_pages=torch.zeros(max_bs, max_pages, dtype=torch.int64, device=device),
            fill_page=torch.full((max_bs,), -1, dtype=torch.int64, device=device),
        )

    def view(self, bs: int) -> DevicePlan:
        """The first `bs` rows (static buffers are sized for the largest captured batch)."""
        return DevicePlan(
            self.table[:, :bs], self.layer_sparse[:, :bs], self.phys_pages[:bs], self.fill_page[:bs]
        )


def copy_host(plan: DevicePlan, host: HostPlan) -> None:
    """Host plan -> device plan (outside any graph: a host-to-device copy)."""
    plan.table.copy_(host.table, non_blocking=True)
    plan.layer_sparse.copy_(host.layer_sparse, non_blocking=True)


def fill_pages(
    plan: DevicePlan, req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, page_size: int
) -> None:
    """The physical pages of every row and the page its new token completed: static-shape device ops only
    (recorded in the graph), reading the runner's req_pool_indices and the pool's req_to_token."""
    P = page_size
    lens = plan.seq_lens
    max_pages = plan.phys_pages.shape[1]
    rows = req_to_token.index_select(0, req_pool_indices.to(torch.int64))
    first = rows[:, : max_pages * P : P].to(torch.int64) // P
    plan.phys_pages[:, : first.shape[1]].copy_(first)
    # A decode step's new token (position len - 1) completes page len // P - 1 when len % P == 0.
    done = (lens % P == 0) & (lens > 0)
    last = torch.clamp(lens // P - 1, min=0, max=max_pages - 1)
    page_of_last = plan.phys_pages.gather(1, last[:, None])[:, 0]
    plan.fill_page.copy_(torch.where(done, page_of_last, -1))
