"""The CPU hash of seeded sampling equals SGLang's Triton murmur hash bit for bit (run by Triton's
interpreter on CPU tensors, in a subprocess since TRITON_INTERPRET is read when kernels are defined)."""

import json
import os
import subprocess
import sys

import torch

from sglang_patches.seeded_sampling import murmur_hash32_torch

SEEDS = [0, 1234, 2**40 + 7, 2**62 - 1]
POSITIONS = [0, 5, 1100, 2**20]
COLS = 300

KERNEL = f"""
import json, torch, triton
from sglang.kernels.ops.sampling.murmur_hash import murmur_hash32_kernel
seed = torch.tensor({SEEDS}, dtype=torch.uint64)
pos = torch.tensor({POSITIONS}, dtype=torch.int64)
col = torch.arange({COLS})
out = torch.empty((len(seed), {COLS}), dtype=torch.uint32)
murmur_hash32_kernel[(len(seed), triton.cdiv({COLS}, 1024))](seed, pos, col, out, len(seed), {COLS}, BLOCK_SIZE=1024)
print(json.dumps(out.to(torch.int64).tolist()))
"""


def test_cpu_hash_equals_sglang_kernel():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    seed = torch.tensor(SEEDS, dtype=torch.uint64)
    got = murmur_hash32_torch(seed, torch.tensor(POSITIONS), torch.arange(COLS))
    assert torch.equal(got, expected)
