"""Run under torchrun by test_checkpoint: train, save, train; then a fresh policy resumes and trains.

Each rank writes rank{r}.pt with the uninterrupted and the resumed step's metrics and local parameters.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def batch(seed: int):
    from sparrow_megatron.trainer import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [torch.randint(5, 120, (n,), generator=g).tolist() for n in (5, 3, 7)]
    rollout = [(-4.8 + 0.5 * torch.randn(len(r), generator=g)).tolist() for r in responses]
    return RolloutBatch(prompts, responses, rollout, advantages=[1.0, -0.5, -0.5])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument(
        "--save-only",
        action="store_true",
        help="train, save, export HF (saved_hf/), train once more, export (expected_hf/): for resharding",
    )
    ap.add_argument("--async-save", action="store_true", help="trainer.async_save: finalize after a step")
    args = ap.parse_args()
    from policy_args import make_policy  # this script's directory is on sys.path

    def policy():
        return make_policy(
            args.model_dir, tp=args.tp, pp=args.pp, lr=1e-3, warmup_steps=1, micro_batch_tokens=20,
            async_save=args.async_save,
        )  # fmt: skip

    out = Path(args.out)
    run = policy()
    run.train_step(batch(0))
    run.save_checkpoint(out / "ckpt", extra_state={"cursor": 3})
    if args.save_only:
        run.export_hf(out / "saved_hf")
        metrics = run.train_step(batch(1))
        run.export_hf(out / "expected_hf")
        if torch.distributed.get_rank() == 0:
            torch.save(metrics, out / "expected.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return
    expected = run.train_step(batch(1))
    expected_params = {n: p.detach().clone() for n, p in run.model.module.named_parameters()}
    finalized = run.finalize_checkpoints(blocking=True)  # async: the save ran during that step
    assert finalized == ([str(out / "ckpt")] if args.async_save else []), finalized
    resumed = policy()
    extra = resumed.load_checkpoint(out / "ckpt")
    got = resumed.train_step(batch(1))
    got_params = {n: p.detach().clone() for n, p in resumed.model.module.named_parameters()}
    rank = torch.distributed.get_rank()
    torch.save(
        {
            "expected": expected,
            "got": got,
            "extra": extra,
            "expected_params": expected_params,
            "got_params": got_params,
        },
        out / f"rank{rank}.pt",
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
