"""Qwen3-8B math RL with sparse rollout (tau 0.86, schedule qwen3-8b-0.86) on Slurm.

    sparrow submit recipes/qwen3_8b_math.py model.hf_dir=/models/Qwen3-8B \
        data.train_path=/data/math/train.jsonl cluster.account=ACCOUNT cluster.partition=PARTITION

Layout and every shared value: sparrow_megatron/recipes.py.
"""

from sparrow_megatron.recipes import qwen3_rl


def recipe():
    return qwen3_rl("8b", "math")
