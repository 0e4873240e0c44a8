"""Qwen3-8B math RL with sparse rollout (tau 0.86, schedule qwen3-8b-0.86) on Slurm.

    sparrow submit recipes/qwen3_8b_math.py model.hf_dir=/models/Qwen3-8B \
        data.train_path=/data/math/train.jsonl cluster.account=ACCOUNT cluster.partition=PARTITION

Layout and every shared value: sparrow_megatron/recipes.py.
"""

from sparrow_megatron.recipes import qwen3_rl


def recipe():
    cfg = qwen3_rl("8b", "math")
    # Long-context memory settings (docs/trainer.md): full recompute of every layer and log-probs in
    # 4096-token chunks; sequence parallelism is on by default at TP > 1.
    # `sparrow plan recipes/qwen3_8b_math.py` shows every term against the GPU.
    cfg.trainer.recompute = "full"
    cfg.trainer.logprob_chunk_tokens = 4096
    return cfg
