"""The embedded default job: the synthetic recall task on the committed tiny Qwen3, all on CPU.

One SGLang engine with the `sparrow` backend, the Megatron trainer in-process, MLflow in the sqlite
store beside the run directory. Sized to finish in minutes on 2 cores. `recipes/tiny_cpu.py` returns it.
"""

from __future__ import annotations

from sparrow_megatron.config import JobConfig
from sparrow_megatron.data.recall import EMBEDDED_HAYSTACK

# The recall prompts are ~0.54K-1.56K tokens (data.haystack) and the answers a few tokens, so decode
# positions fall in 4-5 bins of 256; a 256-token budget keeps 16 of the ~34-98 pages, a smaller share the
# longer the prompt: the tail p5 falls with position and the controller raises each bin on its own.
TINY_SCHEDULE = "tiny-recall-256"


def tiny_cpu() -> JobConfig:
    cfg = JobConfig(name="tiny-cpu")
    cfg.data.kind = "synthetic"
    cfg.data.max_response_tokens = 8
    # 16 training prompts, 4 per step: 4 epochs in 16 steps, so the reward on the same prompts can be
    # seen rising epoch over epoch (fresh prompts every step make single steps mostly prompt noise).
    cfg.data.train_size = 16
    cfg.data.haystack = list(EMBEDDED_HAYSTACK)
    cfg.rollout.engines = 1
    cfg.rollout.n_samples = 8
    cfg.rollout.temperature = 1.0
    # The tiny vocabulary has 128 tokens: full log-prob lists make the acceptance exact, not bounded
    # (a near-uniform guess over 26 letters puts a quarter of its mass outside a top-20 list).
    cfg.rollout.top_k_logprobs = 128
    cfg.rollout.schedule = TINY_SCHEDULE
    cfg.rollout.kv_pool_tokens = 32768  # the step's 8 distinct <= 1.56K prompts stay cached, dense + sparse
    cfg.monitor.bin_width = 256
    cfg.monitor.min_bin_tokens = 20
    # The tail controller on: 256 tokens leaves the p5 below tau on this task, so the run shows it
    # raising the budget of the populated bin (and lowering it again after `patience` good steps).
    cfg.monitor.controller.enabled = True
    cfg.monitor.controller.min_budget = 128
    cfg.monitor.controller.step_tokens = 128
    cfg.trainer.dtype = "fp32"
    cfg.trainer.lr = 2e-4
    cfg.trainer.micro_batch_tokens = 16384
    cfg.loop.steps = 16
    cfg.loop.prompts_per_step = 4
    cfg.loop.checkpoint_every = 8
    cfg.loop.eval_every = 8  # held-out mean@k / pass@k, dense and sparse: before step 1, after 8 and 16
    cfg.loop.eval_prompts = 8
    cfg.loop.eval_samples = 4
    cfg.loop.run_dir = "runs/tiny-cpu"
    return cfg
