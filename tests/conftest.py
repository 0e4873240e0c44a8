"""Triton's interpreter for the whole test run when CUDA is absent, unless the caller chose
(TRITON_INTERPRET=0 or 1 in the environment is kept).

Triton fixes interpreted vs compiled when it is imported and when each kernel is defined, and any test
module may import it first (SGLang does, on import): so the choice is made here, before collection,
once for every folder. With CUDA present the kernels compile for the GPU, and their tests use it.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        cuda = torch.cuda.is_available()  # does not import triton
    except ImportError:
        cuda = False
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
