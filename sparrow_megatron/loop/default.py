"""The embedded default job: the synthetic recall task on the committed tiny Qwen3, all on CPU.

One SGLang engine with the `sparrow` backend, the Megatron trainer in-process, MLflow in a sqlite
file of the run directory. Sized to finish in minutes on 2 cores. `recipes/tiny_cpu.py` returns it.
"""

from __future__ import annotations

from sparrow_megatron.config import JobConfig

# The recall prompts are ~1.1K tokens and the answers a few tokens, so every decode step sits in one
# 256-token bin around position 1.1K; a 256-token budget keeps 16 of its ~70 pages.
TINY_SCHEDULE = "tiny-recall-256"


def tiny_cpu() -> JobConfig:
    cfg = JobConfig(name="tiny-cpu")
    cfg.data.kind = "synthetic"
    cfg.data.max_response_tokens = 8
    cfg.rollout.engines = 1
    cfg.rollout.n_samples = 8
    cfg.rollout.temperature = 1.0
    cfg.rollout.schedule = TINY_SCHEDULE
    cfg.monitor.bin_width = 256
    cfg.monitor.min_bin_tokens = 20
    cfg.trainer.dtype = "fp32"
    cfg.trainer.lr = 2e-4
    cfg.trainer.micro_batch_tokens = 16384
    cfg.loop.steps = 30
    cfg.loop.prompts_per_step = 8
    cfg.loop.checkpoint_every = 10
    cfg.loop.run_dir = "runs/tiny-cpu"
    return cfg
