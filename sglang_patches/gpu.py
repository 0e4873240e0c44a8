"""The seam to the Triton sparse-decode kernels (`sparrow_kernels`), used on GPU when importable.

Expected entry point (written by the kernels work; nothing here re-implements the rule):
`sparrow_kernels.sglang_decode.sparse_decode(q, out, layer, forward_batch, landmarks, rows)` with
q/out [B, Hq, D] views, the layer (its KV buffers come from `forward_batch.token_to_kv_pool`), the
landmark buffer [num_pages, Hkv, D] and rows = [(batch row, budget, Schedule)]; it writes the sparse
rows of `out` in place. Until it exists the backend runs the torch reference path on any device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def load_gpu_sparse_decode() -> Callable | None:
    try:
        from sparrow_kernels.sglang_decode import sparse_decode  # type: ignore[import-not-found]
    except ImportError:
        logger.warning("sparrow_kernels.sglang_decode not importable: sparse decode runs the torch path")
        return None
    return sparse_decode
