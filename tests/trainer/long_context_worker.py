"""Run by tests/trainer/test_long_context.py under torchrun (TP=2, gloo): the long-context settings.

1. Chunked vs one-shot vocab-parallel log-probs on random sharded logits: values, entropy, top-K and
   gradients, and the peak memory of each (MemTracker counts CPU bytes exactly).
2. One Policy per setting (recompute none/selective/full-uniform/full-block, SP on/off, packed/padded,
   log-prob chunk size): score + one GRPO step with lr=0; log-probs, loss, gradients and the step's
   peak memory.

Global rank 0 writes everything to --out/result.pt.
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import weakref  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

VARIANTS = {
    "base": dict(sequence_parallel=False),
    "sp": dict(sequence_parallel=True),
    "selective": dict(sequence_parallel=False, recompute="selective"),
    "full": dict(sequence_parallel=False, recompute="full", recompute_num_layers=1),
    "full_sp": dict(sequence_parallel=True, recompute="full", recompute_num_layers=1),
    "block_sp": dict(
        sequence_parallel=True, recompute="full", recompute_method="block", recompute_num_layers=2
    ),
    "padded": dict(sequence_parallel=False, pack_sequences=False),
    "padded_sp_full": dict(sequence_parallel=True, pack_sequences=False, recompute="full"),
    "chunk7": dict(sequence_parallel=False, logprob_chunk_tokens=7),
}


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside (each counted until its storage is freed).

    torch's MemTracker does this too but also hooks every module, which Megatron's DDP wrapper (a
    `buffers` list attribute) and multi-micro-batch schedules (one module called per micro-batch) break.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    self._seen[st] = n = st.nbytes()
                    weakref.finalize(st, self._free, n)
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


def _peak(fn):
    """(result, peak bytes) of fn(); tensors made before are not counted."""
    with _PeakBytes() as tracker:
        out = fn()
    return out, tracker.peak


def logprob_case() -> dict:
    from sparrow_megatron.trainer.logprobs import token_stats, vocab_parallel_logprobs, vocab_parallel_topk

    tp_rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(0)
    n, vocab = 600, 512  # vocab 256 per TP rank
    full = 3 * torch.randn(n, vocab, generator=g)
    index = torch.randperm(n, generator=g)[:500]
    targets = torch.randint(0, vocab, (500,), generator=g)
    upstream = torch.randn(500, generator=g)
    local = full[:, tp_rank * 256 : (tp_rank + 1) * 256].clone()

    def one_shot():
        x = local.clone().requires_grad_()
        stats = vocab_parallel_logprobs(x[index], targets, temperature=0.8)
        (stats.logprobs * upstream).sum().backward()
        return stats.logprobs.detach(), stats.entropy.detach(), x.grad

    def chunked():
        x = local.clone().requires_grad_()
        stats = token_stats(x, index, targets, temperature=0.8, chunk_tokens=64)
        (stats.logprobs * upstream).sum().backward()
        return stats.logprobs.detach(), stats.entropy.detach(), x.grad

    (lp1, ent1, grad1), peak1 = _peak(one_shot)
    (lp2, ent2, grad2), peak2 = _peak(chunked)
    ids1, tlp1 = vocab_parallel_topk(local[index], 5, temperature=0.8)
    scored = token_stats(local, index, targets, temperature=0.8, chunk_tokens=64, top_k=5)
    # The exact answer from the unsharded logits, in float64.
    ref = torch.log_softmax(full.double() / 0.8, dim=-1)[index]
    return {
        "lp": (lp1, lp2, ref.gather(-1, targets[:, None])[:, 0]),
        "ent": (ent1, ent2, -(ref.exp() * ref).sum(-1)),
        "grad": (grad1, grad2),
        "topk": ((ids1, tlp1), (scored.topk_ids, scored.topk_logprobs)),
        "scored_lp": scored.logprobs,
        "peak": (peak1, peak2),
        "entropy_requires_grad": chunked_entropy_requires_grad(local, index, targets),
    }


def chunked_entropy_requires_grad(local, index, targets) -> bool:
    from sparrow_megatron.trainer.logprobs import token_stats

    x = local.clone().requires_grad_()
    return token_stats(x, index, targets, chunk_tokens=64).entropy.requires_grad


def long_batch():
    from sparrow_megatron.trainer import RolloutBatch, group_advantages

    g = torch.Generator().manual_seed(11)
    prompt_lens, resp_lens = [9, 14, 5, 20], [150, 97, 201, 60]
    prompts = [torch.randint(5, 120, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(5, 120, (n,), generator=g).tolist() for n in resp_lens]
    rollout = [(-4.8 + 0.3 * torch.randn(n, generator=g)).tolist() for n in resp_lens]
    adv = group_advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1]).tolist()
    return RolloutBatch(prompts, responses, rollout, adv)


def policy_case(model_dir: str, tp: int) -> dict:
    from policy_args import make_policy  # this script's directory is on sys.path

    out = {}
    for name, overrides in VARIANTS.items():
        policy = make_policy(model_dir, tp=tp, micro_batch_tokens=400, lr=0.0, grad_clip=0.0, temperature=0.9,
                             **overrides)  # fmt: skip
        batch = long_batch()
        scored = policy.score(batch, top_k=3)
        batch.old_logprobs = scored.logprobs
        metrics, peak = _peak(lambda policy=policy, batch=batch: policy.train_step(batch))
        out[name] = {
            "logprobs": scored.logprobs,
            "entropy": scored.entropy,
            "topk_ids": scored.topk_ids,
            "metrics": metrics,
            "grads": policy.hf_grads(),
            "peak": peak,
            "sequence_parallel": policy.config.sequence_parallel,
            "recompute": policy.config.recompute_granularity,
        }
        del policy
        gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args()

    from sparrow_megatron.trainer import init_distributed

    init_distributed(args.tp, 1)
    result = {"logprobs": logprob_case(), "policy": policy_case(args.model_dir, args.tp)}
    if torch.distributed.get_rank() == 0:
        torch.save(result, Path(args.out) / "result.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
