#!/usr/bin/env python
"""Reproduce the committed tiny recall checkpoint: sparrow_megatron/assets/tiny_recall/.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/pretrain_tiny.py \
        --out sparrow_megatron/assets/tiny_recall

Four seeded stages, each continuing the previous one (one thread: the same torch build gives the same
weights). Minutes are wall time of training on a busy shared 2-core machine, plus ~1-2 minutes of eval
each:
  1. PretrainConfig defaults from random init: 250 steps, haystacks up to 192 (~11 min). Learns the
     digit needle only; the letter losses sit at chance (log 26) and greedy answers a constant letter.
  2. 100 steps up to 320 (~5 min). Still digit only (dense greedy 0.375 at 1100).
  3. 700 steps on short haystacks (16-64, cheap; ~12 min). The letter needles are learned one class
     after the other (uppercase first, lowercase only partly by the end): they were never a length
     problem (the stage-2 model fails them at haystack 16 too) but a loss plateau that the few long,
     expensive steps of stages 1-2 could not cross. The loss was already on the response only.
     Dense greedy 0.427 at 1100 (length generalisation from 64 is poor).
  4. 100 steps with a curriculum 64 -> 512 (~3 min). Dense greedy 0.818 at 1100 (digit 0.81,
     uppercase 0.84, lowercase 0.72 on 32 eval prompts); at temperature 1, 60 of 64 eval prompts get
     unequal rewards across 8 samples (scripts/recall_sampling_spread.py): GRPO has signal and room.
recall_pretrain.json (last stage) and recall_pretrain_stage{1,2,3}.json record every option, steps,
wall time and the dense greedy accuracy on the eval split (haystack 1100).
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from sparrow_megatron.data.pretrain_recall import PretrainConfig, pretrain

STAGES = (
    PretrainConfig(),
    PretrainConfig(steps=100, max_len=320, lr=3e-3),
    PretrainConfig(steps=700, min_len=16, max_len=64, lr=3e-3, warmup=20, curriculum_frac=0.01, seed=3),
    PretrainConfig(steps=100, min_len=64, max_len=512, lr=2e-3, warmup=10, curriculum_frac=0.6, seed=4),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        previous = None
        records = []
        for number, cfg in enumerate(STAGES, start=1):
            stage_dir = out if number == len(STAGES) else Path(tmp) / f"stage{number}"
            pretrain(stage_dir, cfg, init_from=previous)
            if stage_dir != out:
                records.append((number, stage_dir / "recall_pretrain.json"))
            previous = stage_dir
        for number, record in records:
            shutil.copy(record, out / f"recall_pretrain_stage{number}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
