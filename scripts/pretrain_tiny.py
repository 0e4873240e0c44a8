#!/usr/bin/env python
"""Reproduce the committed tiny recall checkpoint: sparrow_megatron/assets/tiny_recall/.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/pretrain_tiny.py \
        --out sparrow_megatron/assets/tiny_recall

The defaults are the settings of the committed run (seeded, one thread: the same torch build gives the
same weights). Its recall_pretrain.json records every option, the steps done, the wall time and the
dense greedy accuracy on the eval split. About 11 minutes on a busy 2-core machine.
"""

import sys

from sparrow_megatron.data.pretrain_recall import main

if __name__ == "__main__":
    sys.exit(main())
