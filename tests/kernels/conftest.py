"""Kernel tests run on CPU tensors through Triton's interpreter unless the caller chose otherwise.

Triton reads TRITON_INTERPRET when a kernel is defined, so this must run before any sparrow_kernels
module is imported (pytest loads this conftest before collecting the test modules here).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
