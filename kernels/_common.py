"""Helpers shared by the kernels: interpreter detection and the matmul used inside kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors, used by the CI tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def mma(a, b, FP32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation.

    On GPU the inputs go to tensor cores as they are (bf16). The interpreter's tl.dot is wrong for bf16
    operands (triton 3.8), so there the same rounded values are upcast first: bf16 x bf16 products are
    exact in fp32, so both paths compute the same math.
    """
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


@triton.jit
def round_bf16_rne(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32.

    The interpreter's fp32 -> bf16 cast truncates (and ignores fp_downcast_rounding); GPUs round to
    nearest even. Stores that must be bit-exact (landmarks) pre-round with this when interpreting, so
    the later cast is exact. Finite inputs only.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


def dot_min() -> int:
    """Smallest tl.dot tile side: 16 on GPUs; the interpreter takes any size, and small tiles run faster."""
    return 1 if interpreting() else 16
