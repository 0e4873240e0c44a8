"""The torch sparse decode and landmark upkeep, vectorised over the batch (CPU, or GPU without kernels).

Each function is one batched tensor computation per layer: no loop over requests. The math is the
rule's (`sparrow_megatron.sparsity.selection`): landmarks are fp32 page means stored in the KV dtype;
scores are the group-mean query dotted with the landmarks (fp32); the top-k keeps ties at the lower
page index (stable descending sort); attention is fp32 softmax over the selected pages' tokens only,
so a sparse row reads budget / P pages of K/V, not its whole cache.
"""

from __future__ import annotations

import torch

from sglang_patches.decode_plan import DevicePlan
from sparrow_megatron.sparsity.selection import PageGeometry, group_mean_query


def completed_pages(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    old_lens: torch.Tensor,
    new_lens: torch.Tensor,
    page_size: int,
) -> torch.Tensor:
    """Physical pages completed while each request grew old_len -> new_len (extend), as one tensor [N].

    Lens are CPU int tensors (extend batches carry them on the host); one gather, no loop over requests.
    """
    P = page_size
    first, end = old_lens // P, new_lens // P
    counts = (end - first).clamp(min=0)
    total = int(counts.sum())
    device = req_to_token.device
    if total == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    offset = torch.cumsum(counts, 0) - counts
    page = (first[row] + torch.arange(total) - offset[row]).to(device)
    pool_rows = req_pool_indices.to(device=device, dtype=torch.int64)[row.to(device)]
    return req_to_token[pool_rows, page * P].to(torch.int64) // P


def write_page_landmarks(
    keys: torch.Tensor, marks: torch.Tensor, pages: torch.Tensor, page_size: int
) -> None:
    """marks[p] = fp32 mean of the P keys of physical page p, for every p in `pages` (-1 = none).

    One batched op of fixed shape, no host read (graph-safe): a -1 rewrites page 0, the pool's padding
    page that no request owns, with its own value.
    """
    P = page_size
    target = pages.clamp(min=0)
    locs = target[:, None] * P + torch.arange(P, device=keys.device)[None, :]  # [N, P]
    fresh = keys[locs].float().mean(dim=1).to(marks.dtype)
    marks[target] = torch.where((pages >= 0)[:, None, None], fresh, marks[target])


def select_pages_batched(
    q_mean: torch.Tensor,
    marks: torch.Tensor,
    plan: DevicePlan,
    rows: torch.Tensor,
    geometry: PageGeometry,
    max_top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages [R, Hkv, S] logical page ids, valid [R, 1, S] bool) for the sparse rows `rows`.

    S = sink + max_top_k + local; a row keeps sink + its top_k + local pages (the rest is masked).
    """
    sink, local = geometry.sink_pages, geometry.local_pages
    cand_end = plan.cand_end[rows]  # [R]
    width = int(plan.phys_pages.shape[1])
    device = q_mean.device
    R, Hkv = q_mean.shape[0], q_mean.shape[1]
    page_ids = torch.arange(width, device=device)
    cand = plan.phys_pages[rows]  # [R, W] physical page of each logical page
    scores = torch.einsum("rhd,rwhd->rhw", q_mean, marks[cand].float())
    is_cand = (page_ids[None, :] >= sink) & (page_ids[None, :] < cand_end[:, None])
    scores = scores.masked_fill(~is_cand[:, None, :], float("-inf"))
    chosen = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :max_top_k]
    chosen_ok = torch.arange(max_top_k, device=device)[None, :] < plan.top_k[rows][:, None]  # [R, K]
    sink_pages = torch.arange(sink, device=device).expand(R, Hkv, sink)
    local_pages = (cand_end[:, None] + torch.arange(local, device=device)[None, :])[:, None, :]
    pages = torch.cat([sink_pages, chosen, local_pages.expand(R, Hkv, local)], dim=-1)
    ones = torch.ones(R, sink, dtype=torch.bool, device=device)
    valid = torch.cat([ones, chosen_ok, torch.ones(R, local, dtype=torch.bool, device=device)], dim=-1)
    return pages, valid[:, None, :]


def sparse_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: DevicePlan,
    rows: torch.Tensor,
    pages: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    page_size: int,
) -> torch.Tensor:
    """Attention of the sparse rows over the tokens of their selected pages: [R, Hq, Dv] fp32.

    q [R, Hq, D]; pages/valid from `select_pages_batched`. K/V are gathered through the physical page
    of each selected page (token t of logical page p lives in slot phys * P + t).
    """
    P = page_size
    R, Hq, D = q.shape
    Hkv = pages.shape[1]
    device = q.device
    phys = plan.phys_pages[rows][:, None, :].expand(R, Hkv, -1).gather(2, pages)  # [R, Hkv, S]
    tok = torch.arange(P, device=device)
    slots = (phys[..., None] * P + tok).flatten(2)  # [R, Hkv, S*P]
    pos = (pages[..., None] * P + tok).flatten(2)
    ok = valid[..., None].expand(R, Hkv, pages.shape[2], P).flatten(2) & (
        pos < plan.seq_lens[rows][:, None, None]
    )
    heads = torch.arange(Hkv, device=device)[None, :, None]
    k = k_buffer[slots, heads].float()  # [R, Hkv, T, D]
    v = v_buffer[slots, heads].float()
    qf = q.float().reshape(R, Hkv, Hq // Hkv, D)
    logits = torch.einsum("rhgd,rhtd->rhgt", qf, k) * scale
    logits = logits.masked_fill(~ok[:, :, None, :], float("-inf"))
    out = torch.einsum("rhgt,rhtd->rhgd", torch.softmax(logits, dim=-1), v)
    return out.reshape(R, Hq, -1)


def sparse_decode_rows(q3, k_buffer, v_buffer, marks, plan, rows, geometry, max_top_k, scale):
    """Selection + attention of the sparse rows `rows` (one layer): (out [R, Hq, Dv] fp32, pages, valid)."""
    q = q3[rows]
    q_mean = group_mean_query(q, k_buffer.shape[1])
    pages, valid = select_pages_batched(q_mean, marks, plan, rows, geometry, max_top_k)
    out = sparse_attention(q, k_buffer, v_buffer, plan, rows, pages, valid, scale, geometry.page_size)
    return out, pages, valid
