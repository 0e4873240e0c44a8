"""The `sparrow` attention backend: block top-k sparse decode on stock SGLang.

Only the sparse decode is ours. Prefill/extend, dense decode and the KV-cache writes go to SGLang's own
backend for the device (torch_native on CPU, SPARROW_DENSE_BACKEND to pick another), so a request with
no schedule decodes exactly as that backend would. For the rows of a decode batch whose schedule makes
the step sparse, the dense output is replaced by the sparse one:
- on CPU (or on GPU without the kernels) by the torch reference `sparse_decode_reference`, fed with
  the landmarks this backend keeps;
- on GPU by `sparrow_kernels` when importable (see `sglang_patches.gpu`; on CPU too with
  SPARROW_SGLANG_KERNELS=1 and TRITON_INTERPRET=1, for tests).

Landmarks are kept per physical KV page (one buffer per layer, [num_pages, Hkv, D] in the KV dtype),
so the server must run with `--page-size 16`: a request's logical page i lives in the physical page
`req_to_token[slot, i * 16] // 16`. A landmark is written once, when its page fills: at extend for
every page the new tokens complete, at decode when the new token completes a page. Pages shared through
the radix cache keep the landmark computed when they were first filled (same keys, same landmark).
Landmarks are kept for every request, dense ones included, because a later sparse request may reuse
their pages through the prefix cache.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_patches.gpu import KERNELS_ENV, kernels_wanted, load_gpu_sparse_decode
from sglang_patches.recorder import SelectionRecorder
from sglang_patches.schedules import SERVER_PAGE_SIZE, schedules_of, server_default_schedule
from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.reference import sparse_decode_reference
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import compute_landmarks, plan_pages

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
        self.landmarks: dict[int, torch.Tensor] = {}
        self.recorder = SelectionRecorder.from_env()
        self.gpu_sparse_decode = (
            load_gpu_sparse_decode(required=os.environ.get(KERNELS_ENV) == "1")
            if kernels_wanted(self.device)
            else None
        )
        self.forward_metadata = None

    # --- metadata: the dense delegate's, plus nothing of ours (schedules are looked up by request id) ---

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        self.dense.init_forward_metadata(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise UserError(
            "the sparrow backend's sparse decode is not CUDA-graph safe yet: launch with "
            "--cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled"
        )

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()

    def support_triton(self):
        return self.dense.support_triton()

    # --- forward ---

    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True, **kwargs):  # fmt: skip
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and not layer.is_cross_attention:
            prefix_lens = _as_list(forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens)
            seq_lens = _as_list(forward_batch.seq_lens_cpu, forward_batch.seq_lens)
            slots = forward_batch.req_pool_indices.tolist()
            self._fill_landmarks(layer, slots, prefix_lens, seq_lens)
        return out

    def forward_decode(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True, **kwargs):  # fmt: skip
        out = self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if layer.is_cross_attention:
            return out
        seq_lens = _as_list(forward_batch.seq_lens_cpu, forward_batch.seq_lens)
        slots = forward_batch.req_pool_indices.tolist()
        if save_kv_cache:  # the new token (already in the cache) may complete a page
            self._fill_landmarks(layer, slots, [n - 1 for n in seq_lens], seq_lens)
        rows = self._sparse_rows(layer, forward_batch, seq_lens)
        if rows:
            self._sparse_decode(q, out, layer, forward_batch, slots, seq_lens, rows)
        return out

    # --- ours ---

    def _landmark_buffer(self, layer: RadixAttention) -> torch.Tensor:
        buf = self.landmarks.get(layer.layer_id)
        if buf is None:
            keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            buf = torch.zeros(keys.shape[0] // self.page_size, *keys.shape[1:], dtype=keys.dtype,
                              device=keys.device)  # fmt: skip
            self.landmarks[layer.layer_id] = buf
        return buf

    def _fill_landmarks(self, layer, slots: list[int], old_lens: list[int], new_lens: list[int]) -> None:
        """Write the landmarks of the pages that became full when a request grew old_len -> new_len."""
        P = self.page_size
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        buf = self._landmark_buffer(layer)
        req_to_token = self.req_to_token_pool.req_to_token
        for slot, old, new in zip(slots, old_lens, new_lens, strict=True):
            first, end = old // P, new // P
            if end <= first:
                continue
            locs = req_to_token[slot, first * P : end * P].long()
            buf[locs[::P] // P] = compute_landmarks(keys[locs], P)

    def _sparse_rows(self, layer, forward_batch, seq_lens: list[int]) -> list[tuple[int, int, Schedule]]:
        """(row, budget, schedule) of the requests whose step is sparse at this layer."""
        schedules = schedules_of(forward_batch.rids)
        if not schedules:
            return []
        rows = []
        for i, (schedule, total_len) in enumerate(zip(schedules, seq_lens, strict=True)):
            if schedule is None or layer.layer_id in schedule.dense_layers:
                continue
            budget = schedule.budget_at(total_len)
            if not plan_pages(total_len, budget, schedule.geometry).dense:
                rows.append((i, budget, schedule))
        if rows and (layer.logit_cap or (layer.sliding_window_size or -1) > -1):
            raise UserError(
                f"layer {layer.layer_id}: sparse decode with logit cap or sliding window is unsupported"
            )
        return rows

    def _sparse_decode(self, q, out, layer, forward_batch, slots, seq_lens, rows) -> None:
        num_q_heads, head_dim, v_dim = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        q3 = q.reshape(-1, num_q_heads, head_dim)
        out3 = out.view(-1, num_q_heads, v_dim)
        keys_all = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        values_all = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        marks_all = self._landmark_buffer(layer)
        req_to_token = self.req_to_token_pool.req_to_token
        if self.gpu_sparse_decode is not None:
            selection = self.gpu_sparse_decode(q3, out3, layer, forward_batch, marks_all, rows)
            if self.recorder is not None and selection is not None and selection[0] is not None:
                self._record_kernel_selection(q3, layer, forward_batch, slots, seq_lens, rows, selection)
            return
        P = self.page_size
        for i, budget, schedule in rows:
            total_len = seq_lens[i]
            locs = req_to_token[slots[i], :total_len].long()
            keys, values = keys_all[locs], values_all[locs]
            marks = marks_all[locs[: (total_len // P) * P : P] // P]
            o, selected = sparse_decode_reference(
                q3[i : i + 1],
                [keys],
                [values],
                [budget],
                schedule.geometry,
                scale=layer.scaling,
                landmarks=[marks],
            )
            out3[i] = o[0].to(out3.dtype)
            if self.recorder is not None:
                rid = forward_batch.rids[i] if forward_batch.rids else str(slots[i])
                self.recorder.record(layer.layer_id, rid, total_len, budget, q3[i], keys, marks, selected[0])

    def _record_kernel_selection(self, q3, layer, forward_batch, slots, seq_lens, rows, selection) -> None:
        """What the torch path records, for the kernels' selection (the recorder is test-only)."""
        P = self.page_size
        page_table, num_selected = selection
        keys_all = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        marks_all = self._landmark_buffer(layer)
        req_to_token = self.req_to_token_pool.req_to_token
        for j, (i, budget, _) in enumerate(rows):
            total_len = seq_lens[i]
            locs = req_to_token[slots[i], :total_len].long()
            marks = marks_all[locs[: (total_len // P) * P : P] // P]
            selected = page_table[j, :, : int(num_selected[j])].long()
            rid = forward_batch.rids[i] if forward_batch.rids else str(slots[i])
            self.recorder.record(
                layer.layer_id, rid, total_len, budget, q3[i], keys_all[locs], marks, selected
            )


def _as_list(cpu_values, tensor) -> list[int]:
    if cpu_values is not None:
        return [int(x) for x in (cpu_values.tolist() if torch.is_tensor(cpu_values) else cpu_values)]
    return [int(x) for x in tensor.tolist()]
