"""Qwen3-1.7B code RL with sparse rollout (tau 0.86, schedule qwen3-1.7b-0.86) on Slurm.

    sparrow submit recipes/qwen3_1p7b_code.py model.hf_dir=/models/Qwen3-1.7B \
        data.train_path=/data/code/train.jsonl cluster.account=ACCOUNT cluster.partition=PARTITION

Layout and every shared value: sparrow_megatron/recipes.py.
"""

from sparrow_megatron.recipes import qwen3_rl


def recipe():
    cfg = qwen3_rl("1.7b", "code")
    # Long-context memory settings (docs/trainer.md): full recompute of every layer and log-probs in
    # 4096-token chunks; sequence parallelism is on by default at TP > 1.
    # `sparrow plan recipes/qwen3_1p7b_code.py` shows every term against the GPU.
    cfg.trainer.recompute = "full"
    cfg.trainer.logprob_chunk_tokens = 4096
    return cfg
