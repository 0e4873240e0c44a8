#!/usr/bin/env python
"""Reproduce the committed tiny recall checkpoint: sparrow_megatron/assets/tiny_recall/.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/pretrain_tiny.py \
        --out sparrow_megatron/assets/tiny_recall

Two seeded stages (one thread: the same torch build gives the same weights): stage 1 = the
PretrainConfig defaults from random init (250 steps, haystacks up to 192 characters), stage 2 = 100
more steps from stage 1 with haystacks up to 320 characters. recall_pretrain.json (stage 2) and
recall_pretrain_stage1.json record every option, steps, wall time and the dense greedy accuracy on the
eval split. About 11 + 5 minutes of training on a busy 2-core machine, plus ~1 minute of eval each.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from sparrow_megatron.data.pretrain_recall import PretrainConfig, pretrain

STAGE_2 = PretrainConfig(steps=100, max_len=320, lr=3e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as stage1:
        pretrain(stage1, PretrainConfig())
        pretrain(out, STAGE_2, init_from=stage1)
        shutil.copy(Path(stage1) / "recall_pretrain.json", out / "recall_pretrain_stage1.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
