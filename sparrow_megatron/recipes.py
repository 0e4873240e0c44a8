"""The published Qwen3 recipes in one place: `recipes/qwen3_*.py` each call `qwen3_rl(size, task)`.

Values from the paper: tau 0.86 with the published `qwen3-*-0.86` schedules, a 37K
generation cutoff for math and 24K for code, GRPO eps 0.2/0.28 with dual clip 3 and TIS (cap 3, the
reference code's example). DistillSparse's rank, alpha and lr are ours (docs/algorithm.md). The layout
(nodes, TP/PP, engines) is sized for 8-GPU H100/H200 nodes; every field is overridable
(`sparrow submit recipes/qwen3_14b_math.py trainer.pp=1 ...`). Model and data paths are placeholders:
validation names them until the user sets `model.hf_dir=...` and `data.train_path=...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparrow_megatron.config import JobConfig
from sparrow_megatron.trainer.config import ALL_LINEAR

Task = Literal["math", "code"]


@dataclass(frozen=True)
class Qwen3Layout:
    """How one model size is split over the machines (heads: 16/32/32/40, KV heads 8 for all)."""

    hf_name: str  # the Hugging Face checkpoint the user downloads (the placeholder path names it)
    schedule: str  # sparsity.schedule.PRESETS
    rollout_nodes: int
    trainer_nodes: int
    trainer_tp: int
    trainer_pp: int
    engine_tp: int
    micro_batch_tokens: int


LAYOUTS = {
    "1.7b": Qwen3Layout("Qwen3-1.7B", "qwen3-1.7b-0.86", 1, 1, 1, 1, 1, 40960),
    "4b": Qwen3Layout("Qwen3-4B", "qwen3-4b-0.86", 1, 1, 2, 1, 1, 40960),
    "8b": Qwen3Layout("Qwen3-8B", "qwen3-8b-0.86", 2, 2, 4, 1, 2, 40960),
    # 14B: TP 4 x PP 2 over 16 trainer GPUs (DP 2); 4 engines of TP 2 per rollout node.
    "14b": Qwen3Layout("Qwen3-14B", "qwen3-14b-0.86", 2, 2, 4, 2, 2, 40960),
}

GPUS_PER_NODE = 8
TAU = 0.86
# Generation cutoffs of the paper; prompt + response stays under Qwen3's 40960 positions.
MAX_RESPONSE_TOKENS = {"math": 37_000, "code": 24_000}
MAX_PROMPT_TOKENS = {"math": 1024, "code": 2048}


def qwen3_rl(size: str, task: Task) -> JobConfig:
    layout = LAYOUTS[size]
    name = f"qwen3-{size.replace('.', 'p')}-{task}"
    cfg = JobConfig(name=name)
    cfg.model.name = layout.hf_name
    cfg.model.hf_dir = f"/path/to/{layout.hf_name}"
    cfg.data.kind = task
    cfg.data.train_path = f"/path/to/{task}/train.jsonl"
    cfg.data.max_prompt_tokens = MAX_PROMPT_TOKENS[task]
    cfg.data.max_response_tokens = MAX_RESPONSE_TOKENS[task]

    cfg.rollout.schedule = layout.schedule
    cfg.rollout.engine_tp = layout.engine_tp
    cfg.rollout.engines = layout.rollout_nodes * GPUS_PER_NODE // layout.engine_tp
    cfg.rollout.n_samples = 8
    cfg.rollout.temperature = 1.0
    cfg.rollout.top_k_logprobs = 20
    cfg.rollout.timeout_s = 3600.0  # one 37K-token generation on a busy engine
    # Weights travel GPU to GPU: one NCCL broadcast per bucket to every engine (docs/cluster.md);
    # rollout.weight_sync=disk is the fallback when the nodes cannot open NCCL connections to each other.
    cfg.rollout.weight_sync = "distributed"

    cfg.monitor.tau = TAU
    cfg.monitor.bin_width = 2000  # the schedules' bins

    cfg.grpo.eps_low, cfg.grpo.eps_high = 0.2, 0.28
    cfg.grpo.dual_clip = 3.0
    cfg.grpo.tis_cap = 3.0  # the reference's code example (its math example turns TIS off)
    cfg.grpo.std = "unbiased"  # torch.std, as the reference's GRPO advantage
    # DistillSparse, off by default (distill.enabled=true turns it on: the loop trains the adapter each
    # step and the engines serve it on sparse requests). Adapter on every linear layer, as the reference's
    # sparse_target_modules. kl_lambda 1e-3 is the reference's dense_kl_loss_coef default; rank 16,
    # alpha 32 and lr 1e-4 are our choice: neither the paper nor the reference's examples give them.
    cfg.distill.enabled = False
    cfg.distill.target_modules = list(ALL_LINEAR)
    cfg.distill.tis_cap = None  # the reference's sparse_tis_imp_ratio_cap default (-1: off)
    cfg.distill.rank, cfg.distill.alpha, cfg.distill.kl_lambda, cfg.distill.lr = 16, 32.0, 1e-3, 1e-4

    cfg.trainer.tp = layout.trainer_tp
    cfg.trainer.pp = layout.trainer_pp
    cfg.trainer.lr = 1e-6
    cfg.trainer.dtype = "bf16"
    cfg.trainer.micro_batch_tokens = layout.micro_batch_tokens
    # A 14B save (bf16 weights, fp32 master copy and AdamW moments: ~14 bytes x 14B = ~200 GB over the
    # job) goes on in the background: the step stalls only for the device-to-host copy; the checkpoint
    # counts once every rank's write is finalized.
    cfg.trainer.async_save = True

    cfg.loop.steps = 500
    cfg.loop.prompts_per_step = 32
    cfg.loop.checkpoint_every = 10
    # And every 30 minutes: a slow phase (long generations) cannot push a 4-hour job past its limit
    # with hours of unsaved steps; the USR1 notice before the limit saves the step in flight too.
    cfg.loop.checkpoint_every_s = 1800.0
    cfg.loop.run_dir = f"runs/{name}"
    cfg.tracking.experiment = name

    cfg.cluster.executor = "slurm"
    cfg.cluster.gpus_per_node = GPUS_PER_NODE
    cfg.cluster.rollout_nodes = layout.rollout_nodes
    cfg.cluster.nodes = layout.rollout_nodes + layout.trainer_nodes
    cfg.cluster.time_limit = "04:00:00"
    cfg.cluster.env = {"HF_HUB_OFFLINE": "1"}  # the model is read from model.hf_dir, never downloaded
    return cfg
