"""The `sparrow` attention backend: block top-k sparse decode on stock SGLang.

Prefill/extend and dense decode go to SGLang's own backend for the device (torch_native on CPU,
SPARROW_DENSE_BACKEND to pick another), so a request with no schedule decodes exactly as that backend
would. A decode step is split by row, never computed twice:
- the metadata step (`init_forward_metadata`, or `init_forward_metadata_out_graph` +
  `init_forward_metadata_in_graph` under CUDA graphs) builds the step's plan once
  (`sglang_patches.decode_plan`): each row's budget from its schedule and length, page counts, which
  rows are sparse at which layer, the physical page of every logical page. Every layer reads it.
- Eager, torch path (CPU): the rows dense at this layer go to the delegate, over those rows only; the
  sparse rows go through `torch_decode` in one batched selection + attention call, reading only their
  selected pages.
- Kernel path (GPU, and the CUDA-graph path): the Triton kernels (`sglang_patches.kernel_decode`)
  always launch, dense and sparse, masked by the plan's device data, so a graph captured with dummy
  rows replays any mix of schedules.

Landmarks are kept per physical KV page (one buffer per layer, [num_pages, Hkv, D] in the KV dtype,
allocated at start-up and counted in the KV pool's memory budget by the plugin), so the server must run
with `--page-size 16`: a request's logical page i lives in the physical page
`req_to_token[slot, i * 16] // 16`. A landmark is written once, when its page fills: at extend for
every page the new tokens complete, at decode when the new token completes a page. Pages shared through
the radix cache keep the landmark computed when they were first filled (same keys, same landmark).
Landmarks are kept for every request, dense ones included, because a later sparse request may reuse
their pages through the prefix cache.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend, SharedReadEnds
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_patches import decode_plan, torch_decode
from sglang_patches.gpu import KERNELS_ENV, kernels_wanted, load_kernel_decode
from sglang_patches.recorder import SelectionRecorder
from sglang_patches.schedules import (
    SERVER_PAGE_SIZE,
    current_step_schedules,
    schedules_of,
    server_default_schedule,
)
from sparrow_megatron.errors import UserError

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

DENSE_BACKEND_ENV = "SPARROW_DENSE_BACKEND"


def dense_backend_name(device: torch.device) -> str:
    name = os.environ.get(DENSE_BACKEND_ENV, "").strip()
    if name:
        return name
    return "torch_native" if torch.device(device).type == "cpu" else "flashinfer"


def landmark_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """What the landmark buffers add to each KV-pool token (one landmark per 16-token page per layer)."""
    return -(-num_layers * num_kv_heads * head_dim * dtype_bytes // SERVER_PAGE_SIZE)


class SparrowAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

        name = dense_backend_name(model_runner.device)
        if name == "sparrow" or name not in ATTENTION_BACKENDS:
            raise UserError(f"{DENSE_BACKEND_ENV}={name!r} is not an SGLang attention backend to delegate to")
        self.dense = ATTENTION_BACKENDS[name](model_runner)
        self.device = torch.device(model_runner.device)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.page_size = model_runner.page_size
        if self.page_size != SERVER_PAGE_SIZE:
            raise UserError(
                f"the sparrow attention backend needs --page-size {SERVER_PAGE_SIZE} (landmarks are kept "
                f"per KV page), got {self.page_size}"
            )
        # Fail at start-up, not at the first request, when SPARROW_SCHEDULE is wrong.
        default = server_default_schedule()
        logger.info("sparrow attention: dense delegate %s, default schedule %s", name,
                    default.name if default else "dense")  # fmt: skip
        pool = self.token_to_kv_pool
        self.start_layer = int(getattr(pool, "start_layer", 0) or 0)
        self.num_layers = self.start_layer + int(pool.layer_num)
        # Allocated now, like the KV pool itself (the plugin adds their size to the pool's per-token
        # cost, so SGLang's memory budget already holds them).
        self.landmarks: dict[int, torch.Tensor] = {}
        for layer_id in range(self.start_layer, self.num_layers):
            keys = pool.get_key_buffer(layer_id)
            self.landmarks[layer_id] = torch.zeros(
                keys.shape[0] // self.page_size, *keys.shape[1:], dtype=keys.dtype, device=keys.device
            )
        self.recorder = SelectionRecorder.from_env()
        self.kernel_decode = (
            load_kernel_decode(required=os.environ.get(KERNELS_ENV) == "1")
            if kernels_wanted(self.device)
            else None
        )
        if self.kernel_decode is not None:
            from sglang_patches.kernel_decode import write_page_landmarks

            self.write_landmarks = write_page_landmarks  # the Triton landmark kernel
        else:
            self.write_landmarks = torch_decode.write_page_landmarks  # one batched torch op
            if name != "torch_native":
                raise UserError(
                    f"without the kernels, sparse decode splits each batch by rows and hands the dense rows "
                    f"to the delegate, which only torch_native supports: set {DENSE_BACKEND_ENV}=torch_native "
                    f"(got {name!r})"
                )
        self.host_plan: decode_plan.HostPlan | None = None
        self.plan: decode_plan.DevicePlan | None = None
        self.graph_plan: decode_plan.DevicePlan | None = None  # static buffers, CUDA graphs only
        self.graph_mode = False  # this step's plan came through out_graph/in_graph
        self.plans_built = 0  # steps planned (tests check one plan per step, not per layer)
        self.forward_metadata = None

    # --- metadata: the delegate's, plus the decode step's plan (built once, read by every layer) ---

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        self.dense.init_forward_metadata(forward_batch)
        if not forward_batch.forward_mode.is_decode():
            self.host_plan = self.plan = None
            return
        self.graph_mode = False
        host = self._host_plan(forward_batch, forward_batch.batch_size)
        width = max(-(-host.max_len // self.page_size), 1)
        self.plan = decode_plan.DevicePlan.empty(
            forward_batch.batch_size, self.num_layers, width, self.device
        )
        decode_plan.copy_host(self.plan, host)
        decode_plan.fill_pages(
            self.plan, forward_batch.req_pool_indices, self.req_to_token_pool.req_to_token, self.page_size
        )

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Static plan buffers for the largest captured batch; pages bounded by the pool's context length."""
        if self.kernel_decode is None:
            raise UserError(
                f"CUDA-graph decode with the sparrow backend runs the Triton kernels, turned off here "
                f"({KERNELS_ENV}=0): unset it, or launch with --cuda-graph-backend-decode disabled"
            )
        max_pages = -(-self.req_to_token_pool.req_to_token.shape[1] // self.page_size)
        self.graph_plan = decode_plan.DevicePlan.empty(max_bs, self.num_layers, max_pages, self.device)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Host side, before capture or replay: resolve each row's schedule and budget into the static plan.

        The replayed batch carries no request ids: the schedules are those the plugin noted for the batch
        being run (`current_step_schedules`); padded rows are dense."""
        if not forward_batch.forward_mode.is_decode():
            self.dense.init_forward_metadata_out_graph(forward_batch, in_capture)
            return
        bs = forward_batch.batch_size
        self.graph_mode = True
        self.plan = self.graph_plan.view(bs)
        host = self._host_plan(forward_batch, bs, in_capture=in_capture)
        decode_plan.copy_host(self.plan, host)

    def init_forward_metadata_in_graph(self, forward_batch):
        """Device side, recorded in the graph: physical pages and filled pages from the static inputs."""
        if not forward_batch.forward_mode.is_decode():
            self.dense.init_forward_metadata_in_graph(forward_batch)
            return
        decode_plan.fill_pages(
            self.plan, forward_batch.req_pool_indices, self.req_to_token_pool.req_to_token, self.page_size
        )

    def get_cuda_graph_seq_len_fill_value(self):
        # Padded rows have length 1: one page, never sparse, never a filled page.
        return 1

    def shared_read_ends(self, fm):
        # Decode reads the runner's req_pool_indices / seq_lens only in the metadata step (the host copy
        # in out_graph, the page gather recorded by in_graph); the layers read the plan's own buffers.
        if fm.is_decode():
            return SharedReadEnds.IN_REPLAY
        return self.dense.shared_read_ends(fm)

    def support_triton(self):
        return self.dense.support_triton()

    def _host_plan(self, forward_batch, bs: int, in_capture: bool = False) -> decode_plan.HostPlan:
        if in_capture:
            schedules = []
        elif getattr(forward_batch, "rids", None):
            schedules = schedules_of(forward_batch.rids)
        else:
            schedules = current_step_schedules()
            raw_bs = bs - int(getattr(forward_batch, "num_padding", 0) or 0)
            if len(schedules) != raw_bs:  # not the batch the plugin noted: decode it densely, say so
                logger.warning(
                    "sparrow: %d schedules noted for a batch of %d: dense step", len(schedules), raw_bs
                )
                schedules = []
        lens = forward_batch.seq_lens_cpu
        if lens is None:
            lens = forward_batch.seq_lens.cpu()  # outside the graph, once per step
        host = decode_plan.build_host(schedules, lens[:bs].tolist(), self.num_layers, device=self.device)
        self.host_plan = host
        self.plans_built += 1
        return host

    # --- forward ---

    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True, **kwargs):  # fmt: skip
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and not layer.is_cross_attention:
            seq_lens = _host_tensor(forward_batch.seq_lens_cpu, forward_batch.seq_lens)
            prefix = _host_tensor(forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens)
            pages = torch_decode.completed_pages(
                self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, prefix, seq_lens,
                self.page_size,
            )  # fmt: skip
            if len(pages):
                keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
                self.write_landmarks(keys, self.landmarks[layer.layer_id], pages, self.page_size)
        return out

    def forward_decode(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True, **kwargs):  # fmt: skip
        plan, host = self.plan, self.host_plan
        if layer.is_cross_attention or plan is None:
            return self.dense.forward_decode(
                q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs
            )
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        marks = self.landmarks[layer.layer_id]
        split = host.splits.get(layer.layer_id) if host.any_sparse else None
        any_sparse_here = split is not None and len(split[0]) > 0
        if (self.graph_mode or any_sparse_here) and (
            layer.logit_cap or (layer.sliding_window_size or -1) > -1
        ):
            raise UserError(
                f"layer {layer.layer_id}: sparse decode with logit cap or sliding window is unsupported"
            )
        if self.graph_mode or (self.kernel_decode is not None and any_sparse_here):
            if save_kv_cache:
                self._save_kv(layer, forward_batch, k, v)
            self.write_landmarks(keys, marks, plan.fill_page, self.page_size)
            return self.kernel_decode(self, q, layer, forward_batch, marks, bounded=not self.graph_mode)
        if not any_sparse_here:  # every row dense here: the delegate, as without sparrow
            out = self.dense.forward_decode(
                q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs
            )
            self.write_landmarks(keys, marks, plan.fill_page, self.page_size)
            return out
        if save_kv_cache:
            self._save_kv(layer, forward_batch, k, v)
        self.write_landmarks(keys, marks, plan.fill_page, self.page_size)
        sparse_rows, dense_rows, dense_rows_host = split
        num_q_heads, v_dim = layer.tp_q_head_num, layer.v_head_dim
        q3 = q.reshape(-1, num_q_heads, layer.qk_head_dim)
        out = q.new_empty(q3.shape[0], num_q_heads * v_dim)
        out3 = out.view(-1, num_q_heads, v_dim)
        if len(dense_rows):
            sub = _rows_of(forward_batch, dense_rows, dense_rows_host)
            dense_out = self.dense.forward_decode(q3[dense_rows], None, None, layer, sub, save_kv_cache=False)
            out3[dense_rows] = dense_out.view(-1, num_q_heads, v_dim)
        o, pages, valid = torch_decode.sparse_decode_rows(
            q3, keys, self.token_to_kv_pool.get_value_buffer(layer.layer_id), marks, plan, sparse_rows,
            host.geometry, host.max_top_k, layer.scaling,
        )  # fmt: skip
        out3[sparse_rows] = o.to(out3.dtype)
        if self.recorder is not None:
            self._record(q3, layer, forward_batch, sparse_rows, pages, valid)
        return out

    # --- ours ---

    def _save_kv(self, layer, forward_batch, k, v) -> None:
        self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)

    def _record(self, q3, layer, forward_batch, rows, pages, valid) -> None:
        """The recorder is test-only: per-row host work here is fine (never on in production)."""
        P = self.page_size
        keys_all = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        marks_all = self.landmarks[layer.layer_id]
        req_to_token = self.req_to_token_pool.req_to_token
        for j, i in enumerate(rows.tolist()):
            total_len = int(self.plan.seq_lens[i])
            budget = int(self.plan.budget[i])
            slot = int(forward_batch.req_pool_indices[i])
            locs = req_to_token[slot, :total_len].long()
            marks = marks_all[locs[: (total_len // P) * P : P] // P]
            selected = pages[j][:, valid[j, 0]].sort(dim=-1).values
            rid = forward_batch.rids[i] if forward_batch.rids else str(slot)
            self.recorder.record(
                layer.layer_id, rid, total_len, budget, q3[i], keys_all[locs], marks, selected
            )

    def record_kernel(self, q3, layer, forward_batch, sparse, page_table, num_selected) -> None:
        """What the torch path records, for the kernels' selection (test-only; never under a graph)."""
        rows = sparse.nonzero().flatten()
        pages = page_table[rows].long()
        width = pages.shape[-1]
        valid = (torch.arange(width, device=pages.device)[None, :] < num_selected[rows][:, None])[:, None, :]
        self._record(q3, layer, forward_batch, rows, pages, valid)


def _rows_of(forward_batch, rows: torch.Tensor, rows_host: torch.Tensor):
    """A shallow copy of a decode ForwardBatch restricted to `rows` (what the delegate reads in decode);
    `rows_host` indexes the host copies (no device read)."""
    sub = copy.copy(forward_batch)
    sub.batch_size = len(rows)
    sub.req_pool_indices = forward_batch.req_pool_indices[rows]
    sub.seq_lens = forward_batch.seq_lens[rows]
    if forward_batch.seq_lens_cpu is not None:
        sub.seq_lens_cpu = forward_batch.seq_lens_cpu[rows_host]
        sub.seq_lens_sum = int(sub.seq_lens_cpu.sum())
    sub.out_cache_loc = forward_batch.out_cache_loc[rows]
    if getattr(forward_batch, "encoder_lens", None) is not None:
        sub.encoder_lens = forward_batch.encoder_lens[rows]
    return sub


def _host_tensor(cpu_values, tensor) -> torch.Tensor:
    values = cpu_values if cpu_values is not None else tensor
    return torch.as_tensor(values.cpu() if torch.is_tensor(values) else values, dtype=torch.int64)
