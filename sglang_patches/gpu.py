"""Whether decode runs the Triton kernels (`sglang_patches.kernel_decode`): on GPU when importable.

The kernel path serves every row of a decode step (dense rows through the attention kernel's dense
mode, sparse rows through scoring + top-k + sparse attention), masked by the step plan's device data,
so it is also the CUDA-graph path.

When it runs: on CUDA by default (`SPARROW_SGLANG_KERNELS=0` forces the torch path there); on CPU only
with `SPARROW_SGLANG_KERNELS=1` and `TRITON_INTERPRET=1` (Triton's interpreter, for tests). Otherwise the
backend runs the torch path (`sglang_patches.torch_decode`).
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


def load_kernel_decode(required: bool = False) -> Callable | None:
    """The kernel decode path (`sglang_patches.kernel_decode.kernel_decode`), or None (torch path) when
    the kernels are not importable and not `required`."""
    try:
        from sglang_patches.kernel_decode import kernel_decode
    except ImportError as exc:
        if required:
            raise UserError(f"{KERNELS_ENV}=1 but the sparrow_kernels are not importable: {exc}") from exc
        logger.warning("sparrow_kernels not importable (%s): sparse decode runs the torch path", exc)
        return None
    return kernel_decode
