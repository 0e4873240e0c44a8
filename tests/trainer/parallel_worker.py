"""Run by the trainer tests, alone or under torchrun: score + one GRPO step + HF export on a tiny Qwen3.

Writes (global rank 0) `result.pt` with log-probs, entropy, top-K, step metrics and HF-named gradients,
and an HF export of the weights, into --out. The parent test compares runs with different TP/PP.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def parity_batch():
    """Unequal lengths, positive and negative advantages, a masked-out token, off-policy rollout lps."""
    from sparrow_megatron.trainer import RolloutBatch, group_advantages

    g = torch.Generator().manual_seed(7)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21]]
    resp_lens = [6, 9, 3, 11]
    responses = [torch.randint(5, 120, (n,), generator=g).tolist() for n in resp_lens]
    rollout = [(-5.0 + 0.6 * torch.randn(n, generator=g)).tolist() for n in resp_lens]
    adv = group_advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1]).tolist()
    masks = [[1] * n for n in resp_lens]
    masks[1][4] = 0
    return RolloutBatch(prompts, responses, rollout, adv, response_masks=masks, group_ids=[0, 0, 1, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--loss-agg", default="token-mean")
    ap.add_argument("--untied-model-dir", help="also load this (untied) model and export it")
    ap.add_argument("--mini-batches", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.0)  # 0 keeps weights: the step's gradients are compared
    args = ap.parse_args()

    from policy_args import make_policy  # this script's directory is on sys.path

    policy = make_policy(
        args.model_dir,
        tp=args.tp,
        pp=args.pp,
        micro_batch_tokens=32,  # several micro-batches: exercises gradient accumulation
        lr=args.lr,
        mini_batches=args.mini_batches,
        grad_clip=0.0,
        loss_agg=args.loss_agg,
        temperature=0.9,
    )
    batch = parity_batch()
    scored = policy.score(batch)
    metrics = policy.train_step(batch)
    grads = policy.hf_grads()
    out = Path(args.out)
    policy.export_hf(out / "hf_export")
    if torch.distributed.get_rank() == 0:
        torch.save(
            {
                "logprobs": scored.logprobs,
                "entropy": scored.entropy,
                "topk_ids": scored.topk_ids,
                "topk_logprobs": scored.topk_logprobs,
                "metrics": metrics,
                "grads": grads,
                "mini_batch_metrics": policy.mini_batch_metrics,
            },
            out / "result.pt",
        )
    if args.untied_model_dir:
        untied = make_policy(args.untied_model_dir, tp=args.tp, pp=args.pp)
        untied.export_hf(out / "hf_export_untied", max_shard_bytes=100_000)  # sharded, with an index
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
