"""Qwen3-1.7B code RL with sparse rollout (tau 0.86, schedule qwen3-1.7b-0.86) on Slurm.

    sparrow submit recipes/qwen3_1p7b_code.py model.hf_dir=/models/Qwen3-1.7B \
        data.train_path=/data/code/train.jsonl cluster.account=ACCOUNT cluster.partition=PARTITION

Layout and every shared value: sparrow_megatron/recipes.py.
"""

from sparrow_megatron.recipes import qwen3_rl


def recipe():
    return qwen3_rl("1.7b", "code")
