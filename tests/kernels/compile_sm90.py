"""Compile every kernel to a cubin for sm_90 (H100/H200) without a GPU: catches what the interpreter lets
through (types of loop-carried values, tl.dot shape rules, ...). Run with TRITON_INTERPRET unset:

    python -m tests.kernels.compile_sm90 [--all-groups]   (default: GQA group 5 only, the odd one)
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_sm90 needs TRITON_INTERPRET unset")

import triton  # noqa: E402
from sparrow_kernels import decode_attention, landmarks, page_selection, training_attention  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

FLOAT_SCALARS = {"sm_scale"}


def _compile(fn, pointers: dict[str, str], constexprs: dict) -> None:
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm, fn.__name__


def main(groups=(2, 4, 5, 8)) -> None:
    i32, i64, bf16, f32, u8 = "*i32", "*i64", "*bf16", "*fp32", "*u8"
    for head_dim in (64, 128):
        dims = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim)
        _compile(
            landmarks._landmark_kernel,
            dict(K=bf16, ReqToToken=i32, ReqPoolIdx=i32, PageStart=i32, PageEnd=i32, Landmarks=bf16),
            dict(dims, PAGE_SIZE=16, ROUND_BF16=False),
        )
        # The SGLang backend's landmarks of physical pages (int64 page ids, -1 = none).
        _compile(
            landmarks._page_landmark_kernel,
            dict(K=bf16, Pages=i64, Landmarks=bf16),
            dict(dims, PAGE_SIZE=16, ROUND_BF16=False),
        )
        for group in groups:
            gdims = dict(dims, GROUP=group, BLOCK_G=16)
            for physical in (False, True):  # per-request landmarks, or per physical page (the backend's)
                _compile(
                    page_selection._score_kernel,
                    dict(Q=bf16, Landmarks=bf16, ReqPoolIdx=i32, CandStart=i32, CandEnd=i32, Scores=f32,
                         PhysPages=i64 if physical else bf16),
                    dict(gdims, BLOCK_N=128, PHYSICAL=physical),
                )  # fmt: skip
            for dense in (False, True):
                _compile(
                    decode_attention._split_kernel,
                    dict(Q=bf16, K=bf16, V=bf16, ReqToToken=i32, ReqPoolIdx=i32, SeqLens=i32, PageTable=i32,
                         NumSelected=i32, MidO=f32, MidLse=f32),
                    dict(gdims, PAGE_SIZE=16, PAGES_PER_BLOCK=4, DENSE=dense, FP32_DOT=False),
                )  # fmt: skip
            rows = training_attention.rows_per_block(group)
            meta = dict(gdims, BLOCK_G=triton.next_power_of_2(group), ROWS=rows, PAGE_SIZE=16, PAGES_PER_BLOCK=4,
                        FP32_DOT=False)  # fmt: skip
            _compile(
                training_attention._fwd_kernel,
                dict(Q=bf16, K=bf16, V=bf16, RowBits=u8, QPages=i32, QCount=i32, Out=bf16, Lse=f32),
                meta,
            )
            _compile(
                training_attention._bwd_dq_kernel,
                dict(Q=bf16, K=bf16, V=bf16, DO=bf16, Lse=f32, Delta=f32, RowBits=u8, QPages=i32, QCount=i32,
                     DQ=f32),
                meta,
            )  # fmt: skip
            _compile(
                training_attention._bwd_dkdv_kernel,
                dict(Q=bf16, K=bf16, V=bf16, DO=bf16, Lse=f32, Delta=f32, RowBits=u8, KvQBlocks=i32, KvCount=i32,
                     DK=f32, DV=f32),
                meta,
            )  # fmt: skip
        _compile(decode_attention._merge_kernel, dict(MidO=f32, MidLse=f32, Out=bf16), dict(dims, BLOCK_S=8))
    _compile(
        page_selection._topk_kernel,
        dict(Scores=f32, NumPages=i32, CandStart=i32, CandEnd=i32, TopK=i32, PageTable=i32),
        dict(BLOCK_N=1024, SMALL_N=128),
    )
    print("all kernels compile for sm_90")


if __name__ == "__main__":
    main((2, 4, 5, 8) if "--all-groups" in sys.argv else (5,))
