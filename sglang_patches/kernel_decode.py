"""Decode of one layer through the Triton kernels, every row at once, masked by the step plan's data.

Both kernels always launch (a CUDA graph freezes launches at capture, when every row is a dummy):
- the attention kernel in dense mode, over the rows dense at this layer (sparse rows get length 0 and
  read nothing);
- landmark scoring (through the plan's physical page table, no per-request copies), top-k and the
  attention kernel over the selected pages, for the rows sparse at this layer (dense rows get no
  candidates and no pages, and read nothing);
then one select per row. Shapes come from the plan's static buffers (graph mode: the pool's page
bound) or, eagerly, from the step's host plan (`bounded`), never from the rows' schedules.
"""

from __future__ import annotations

import torch
from sparrow_kernels.decode_attention import paged_decode_attention
from sparrow_kernels.landmarks import update_page_landmarks
from sparrow_kernels.page_selection import BatchPlan, score_pages, top_k_pages

from sparrow_megatron.errors import UserError


def write_page_landmarks(
    keys: torch.Tensor, marks: torch.Tensor, pages: torch.Tensor, page_size: int
) -> None:
    """The landmark kernel over physical pages (-1 = none), fixed launch size."""
    update_page_landmarks(keys, marks, pages, page_size)


def kernel_decode(backend, q, layer, forward_batch, marks: torch.Tensor, bounded: bool) -> torch.Tensor:
    plan, host = backend.plan, backend.host_plan
    num_q_heads, head_dim, v_dim = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
    if v_dim != head_dim:
        raise UserError(f"layer {layer.layer_id}: the decode kernels need v_head_dim == qk_head_dim")
    k_buffer = backend.token_to_kv_pool.get_key_buffer(layer.layer_id)
    v_buffer = backend.token_to_kv_pool.get_value_buffer(layer.layer_id)
    q3 = q.reshape(-1, num_q_heads, head_dim).contiguous()
    if k_buffer.dtype != q3.dtype:
        raise UserError(
            f"layer {layer.layer_id}: the decode kernels need the KV cache in the query dtype {q3.dtype}, "
            f"got {k_buffer.dtype} (use --kv-cache-dtype auto)"
        )
    req_to_token = backend.req_to_token_pool.req_to_token
    rpi = forward_batch.req_pool_indices
    P = backend.page_size
    width = plan.phys_pages.shape[1]
    sparse = plan.layer_sparse[layer.layer_id]
    lens32 = plan.seq_lens.to(torch.int32)
    zero = torch.zeros_like(plan.num_pages)
    batch_plan = BatchPlan(
        num_pages=torch.where(sparse, plan.num_pages, zero).to(torch.int32),
        cand_start=torch.where(sparse, plan.cand_start, zero).to(torch.int32),
        cand_end=torch.where(sparse, plan.cand_end, zero).to(torch.int32),
        top_k=torch.where(sparse, plan.top_k, zero - 1).to(torch.int32),
        num_selected=torch.where(sparse, plan.num_selected, zero).to(torch.int32),
        max_candidates=width,
        max_selected=max(host.max_selected, 1) if bounded else width,
        all_dense=False,
    )
    scores = score_pages(q3, marks, rpi, batch_plan, phys_pages=plan.phys_pages)
    page_table, num_selected = top_k_pages(scores, batch_plan)
    common = dict(scale=layer.scaling, page_size=P)
    sparse_out = paged_decode_attention(
        q3, k_buffer, v_buffer, req_to_token, rpi, lens32, page_table, num_selected,
        max_pages=batch_plan.max_selected, **common,
    )  # fmt: skip
    dense_out = paged_decode_attention(
        q3, k_buffer, v_buffer, req_to_token, rpi, torch.where(sparse, 0, lens32), max_pages=width, **common
    )
    out = torch.where(sparse[:, None, None], sparse_out, dense_out)
    if backend.recorder is not None:
        backend.record_kernel(q3, layer, forward_batch, sparse, page_table, num_selected)
    return out.reshape(q.shape[0], num_q_heads * v_dim)
