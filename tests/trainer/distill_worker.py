"""Run by test_distill, alone or under torchrun: sparse scoring + two distill steps + PEFT export.

Writes (global rank 0) `result.pt` with the sparse+adapter log-probs before/after, step metrics and the
exported PEFT tensors into --out; the parent test compares TP/PP splits with the single-rank run. The
distill state after the first step is saved to --out/ckpt; with --resume-from, the worker loads such a
state (saved under any layout) instead of taking the first step.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    from policy_args import make_policy  # this script's directory is on sys.path
    from safetensors.torch import load_file

    from sparrow_megatron.sparsity.schedule import Schedule
    from sparrow_megatron.sparsity.selection import PageGeometry
    from sparrow_megatron.trainer import RolloutBatch
    from sparrow_megatron.trainer.distill import SparseDistiller
    from sparrow_megatron.trainer.lora import LoraSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--resume-from", default="")
    args = ap.parse_args()
    out = Path(args.out)

    policy = make_policy(args.model_dir, tp=args.tp, pp=args.pp, micro_batch_tokens=80, seed=5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (6, 9, 5)]
    responses = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (30, 24, 27)]
    geometry = PageGeometry(page_size=4, sink_pages=1, local_pages=1)
    schedules = [Schedule(budgets=(None, 8, 12), bin_width=12, geometry=geometry)] * 3
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    distiller = SparseDistiller(
        policy, LoraSpec(rank=4, alpha=8.0, target_modules=targets, seed=1), 1.0, 3e-3
    )
    probe = RolloutBatch(prompts, responses)
    dense = policy.score(probe, top_k=0).logprobs
    sparse0 = distiller.score(probe, schedules).logprobs
    rollout = [(x - 0.3 * torch.rand(len(x), generator=g)).tolist() for x in sparse0]  # TIS weights != 1
    batch = RolloutBatch(prompts, responses, rollout, [1.0, -1.0, 0.5])
    if args.resume_from:
        distiller.load(args.resume_from)
        metrics = [None]
    else:
        metrics = [distiller.step(batch, dense, schedules)]
        distiller.save(out / "ckpt")
    metrics.append(distiller.step(batch, dense, schedules))
    after = distiller.score(probe, schedules).logprobs
    exported = distiller.export(out / "adapter")
    if torch.distributed.get_rank() == 0:
        torch.save(
            {
                "sparse0": sparse0,
                "after": after,
                "metrics": metrics,
                "peft": load_file(str(exported / "adapter_model.safetensors")),
            },
            out / "result.pt",
        )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
