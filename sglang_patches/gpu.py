"""The seam to the Triton sparse-decode kernels (`sparrow_kernels`): used on GPU when importable.

Contract (implemented by `sparrow_kernels.sglang_decode.sparse_decode`; nothing here re-implements the
rule): `sparse_decode(q, out, layer, forward_batch, landmarks, rows)` with
- q [B, Hq, D] and out [B, Hq, Dv] views of the decode batch (out already holds the dense delegate's
  output; only the rows listed are overwritten, in place);
- the layer (RadixAttention: layer_id, scaling, tp_q_head_num, qk_head_dim, v_head_dim) and the
  ForwardBatch (K/V from `token_to_kv_pool.get_key_buffer/get_value_buffer(layer_id)`, the pool rows
  from `req_to_token_pool.req_to_token` and `req_pool_indices`, lengths from `seq_lens_cpu`, else
  `seq_lens`);
- the backend's landmark buffer [num_slots // 16, Hkv, D], indexed by PHYSICAL KV page;
- rows = [(batch row, budget, Schedule)], each step sparse; all schedules must share one page
  geometry (a UserError otherwise); the KV cache must be in q's dtype and Dv == D.
It returns (page_table [R, Hkv, max_selected] int32, num_selected [R] int32) of the rows in the order
given (the selected logical pages, ascending), which the backend hands to the selection recorder.

When it runs: on CUDA by default (`SPARROW_SGLANG_KERNELS=0` forces the torch path there); on CPU only
with `SPARROW_SGLANG_KERNELS=1` and `TRITON_INTERPRET=1` (Triton's interpreter, for tests). Otherwise the
backend runs the torch reference path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from sparrow_megatron.errors import UserError

logger = logging.getLogger(__name__)

KERNELS_ENV = "SPARROW_SGLANG_KERNELS"


def kernels_wanted(device: torch.device) -> bool:
    """Whether the sparse decode should go through the Triton kernels on `device` (see the module doc)."""
    flag = os.environ.get(KERNELS_ENV, "").strip()
    if flag not in ("", "0", "1"):
        raise UserError(f"{KERNELS_ENV}={flag!r}: expected 0 or 1")
    if torch.device(device).type == "cuda":
        return flag != "0"
    if flag != "1":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise UserError(f"{KERNELS_ENV}=1 on {device} needs TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    return True


def load_gpu_sparse_decode(required: bool = False) -> Callable | None:
    """The kernels' entry point, or None (torch path) when not importable and not `required`."""
    try:
        from sparrow_kernels.sglang_decode import sparse_decode
    except ImportError as exc:
        if required:
            raise UserError(
                f"{KERNELS_ENV}=1 but sparrow_kernels.sglang_decode is not importable: {exc}"
            ) from exc
        logger.warning(
            "sparrow_kernels.sglang_decode not importable (%s): sparse decode runs the torch path", exc
        )
        return None
    return sparse_decode
