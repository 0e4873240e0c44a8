#!/usr/bin/env python
"""Reproduce the committed tiny recall checkpoint: sparrow_megatron/assets/tiny_recall/.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/pretrain_tiny.py \
        --out sparrow_megatron/assets/tiny_recall

Seeded; the options that produced the committed checkpoint are recorded in its recall_pretrain.json.
"""

import sys

from sparrow_megatron.data.pretrain_recall import main

if __name__ == "__main__":
    sys.exit(main())
