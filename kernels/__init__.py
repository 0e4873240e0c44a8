"""Triton kernels for block top-k sparse decode and its training-side twin (import name `sparrow_kernels`).

The page-selection rule itself lives in `sparrow_megatron.sparsity.selection`; these kernels take their
page plans from it and implement its math. Layouts are documented in each module's docstring.
"""

from sparrow_kernels.decode_attention import paged_decode_attention
from sparrow_kernels.landmarks import landmark_buffer, update_landmarks
from sparrow_kernels.page_selection import BatchPlan, plan_batch, score_pages, select_pages, top_k_pages
from sparrow_kernels.sparse_decode import sparse_paged_decode
from sparrow_kernels.training_attention import block_sparse_attention, select_blocks

__all__ = [
    "BatchPlan",
    "block_sparse_attention",
    "select_blocks",
    "landmark_buffer",
    "paged_decode_attention",
    "plan_batch",
    "score_pages",
    "select_pages",
    "sparse_paged_decode",
    "top_k_pages",
    "update_landmarks",
]
