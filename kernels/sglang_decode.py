"""The SGLang seam: the sparse rows of a decode batch through `sparse_paged_decode`, in place.

Called by `sglang_patches.backend.SparrowAttnBackend` (see `sglang_patches.gpu` for the contract). Two
layouts meet here:
- the backend keeps one landmark per PHYSICAL KV page: `marks_all [num_slots // P, Hkv, D]`, and the
  landmark of a request's logical page p is `marks_all[req_to_token[slot, p * P] // P]` (server page
  size P = 16, so every logical page is one physical page);
- the kernels take landmarks per (pool row, logical page): `[pool_size, max_pages, Hkv, D]`, indexed
  by the same `req_pool_indices` as `req_to_token`.
So, for the sparse rows only, this gathers their logical-page landmarks into a compact
[R, max_pages, Hkv, D] tensor and slices their `req_to_token` rows into a compact [R, ctx] table with
pool rows 0..R-1. The K/V pool itself is read in place. The gather costs one extra read + write of the
rows' landmarks (1/P of their keys) per layer; a kernel that indexes landmarks by physical page
would avoid it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sparrow_kernels.sparse_decode import sparse_paged_decode

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import Schedule


def sparse_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    layer: Any,
    forward_batch: Any,
    landmarks: torch.Tensor,
    rows: Sequence[tuple[int, int, Schedule]],
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """Write the sparse decode output of `rows` into `out` (the other rows are left as they are).

    q [B, Hq, D] and out [B, Hq, Dv] views of the batch; `layer` a RadixAttention (layer_id, scaling,
    tp_q_head_num, qk_head_dim, v_head_dim); `forward_batch` an SGLang ForwardBatch (token_to_kv_pool,
    req_to_token_pool, req_pool_indices, seq_lens_cpu or seq_lens); `landmarks` [num_slots // P, Hkv, D]
    per physical page; rows = [(batch row, budget, schedule)], every step sparse, all schedules of one
    page geometry.

    Returns (page_table [R, Hkv, max_selected] int32, num_selected [R] int32) of the rows, in the order
    of `rows`: each row's selected logical pages, ascending (the first num_selected entries); None when
    `rows` is empty, (None, None) when every row turned out dense (the output is then dense attention).
    """
    if not rows:
        return None
    batch_rows = [int(r) for r, _, _ in rows]
    budgets = [int(b) for _, b, _ in rows]
    geometry = rows[0][2].geometry
    for r, _, schedule in rows:
        if schedule.geometry != geometry:
            raise UserError(
                f"sparse decode batch mixes page geometries: schedule {rows[0][2].name!r} has {geometry}, "
                f"schedule {schedule.name!r} (batch row {r}) has {schedule.geometry}"
            )
    P = geometry.page_size
    num_q_heads, head_dim, v_dim = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
    if q.shape[1:] != (num_q_heads, head_dim) or out.shape[1:] != (num_q_heads, v_dim):
        raise ValueError(
            f"q {tuple(q.shape)} / out {tuple(out.shape)} are not [B, {num_q_heads}, {head_dim}]"
        )
    if v_dim != head_dim:
        raise UserError(
            f"layer {layer.layer_id}: sparse decode kernels need v_head_dim == qk_head_dim, "
            f"got {v_dim} and {head_dim}"
        )
    pool = forward_batch.token_to_kv_pool
    k_buffer = pool.get_key_buffer(layer.layer_id)
    v_buffer = pool.get_value_buffer(layer.layer_id)
    if k_buffer.dtype != q.dtype or v_buffer.dtype != q.dtype:
        raise UserError(
            f"layer {layer.layer_id}: sparse decode kernels need the KV cache in the query dtype {q.dtype}, "
            f"got keys {k_buffer.dtype} / values {v_buffer.dtype} (use --kv-cache-dtype auto)"
        )
    # The backend sizes its landmark buffer as num_slots // (server page size): a schedule page size
    # other than the server's would read the wrong physical pages.
    if landmarks.shape[0] != k_buffer.shape[0] // P:
        raise UserError(
            f"landmark buffer has {landmarks.shape[0]} pages for {k_buffer.shape[0]} KV slots: the server "
            f"page size differs from the schedule's page_size {P}"
        )

    seq_lens_host = forward_batch.seq_lens_cpu
    if seq_lens_host is None:
        seq_lens_host = forward_batch.seq_lens
    all_lens = seq_lens_host.tolist() if torch.is_tensor(seq_lens_host) else list(seq_lens_host)
    lens = [int(all_lens[r]) for r in batch_rows]
    device = q.device
    idx = torch.tensor(batch_rows, dtype=torch.int64, device=device)
    slots = forward_batch.req_pool_indices.to(device=device, dtype=torch.int64)[idx]

    ctx = max(lens)
    req_to_token = forward_batch.req_to_token_pool.req_to_token
    table = req_to_token[slots, :ctx].contiguous()  # [R, ctx]

    # Logical page p of row i lives in physical page table[i, p * P] // P; only full pages have one.
    max_pages = max(ctx // P, 1)
    first_locs = table[:, : max_pages * P : P].long()  # [R, <= max_pages]
    full = torch.tensor([n // P for n in lens], device=device)[:, None]
    pages = torch.arange(first_locs.shape[1], device=device)[None, :]
    # Past a row's full pages the table holds stale or unset slots: point them at page 0 (never read).
    phys = torch.where(pages < full, first_locs // P, 0)
    compact_marks = landmarks[phys]  # [R, max_pages, Hkv, D]

    o, page_table, num_selected = sparse_paged_decode(
        q[idx].contiguous(),
        k_buffer,
        v_buffer,
        table,
        torch.arange(len(rows), dtype=torch.int32, device=device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        lens,
        budgets,
        compact_marks,
        geometry,
        scale=layer.scaling,
    )
    out[idx] = o.to(out.dtype)
    return page_table, num_selected
