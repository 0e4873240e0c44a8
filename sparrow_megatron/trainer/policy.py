"""The dense Qwen3 policy in Megatron-Core: score (log-probs, entropy, top-K) and GRPO train steps.

Every forward, scoring or training, goes through `get_forward_backward_func`, so PP=1 and PP>1 share
one path. Every rank receives the whole batch; DP ranks take token-balanced shards and the micro-batch
count is agreed from the same deterministic packing on every rank (no communication needed).
Micro-batches are packed (THD: samples back to back, attention bounded by `cu_seqlens`, no mask
tensor) unless `pack_sequences` is off or a sparse forward needs rows; log-probs are computed in
chunks of `logprob_chunk_tokens` scored positions.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer import compat
from sparrow_megatron.trainer.async_save import AsyncSaves
from sparrow_megatron.trainer.batch import (
    MicroBatch,
    RolloutBatch,
    balanced_shards,
    build_micro_batch,
    pack_micro_batches,
    split_mini_batches,
)
from sparrow_megatron.trainer.checkpoint import load_checkpoint, save_checkpoint
from sparrow_megatron.trainer.config import GRPOConfig, TrainerConfig
from sparrow_megatron.trainer.context_parallel import local_micro_batch, merge_token_parts, sequence_multiple
from sparrow_megatron.trainer.grpo import GRPOCoefs, grpo_token_loss, token_weights
from sparrow_megatron.trainer.logprobs import token_stats
from sparrow_megatron.trainer.model import (
    LongContext,
    build_gpt_model,
    check_parallel_split,
    layer_spec,
    read_qwen3_config,
    transformer_config,
)
from sparrow_megatron.trainer.optim import CpuAdamW, MegatronOptimizer, lr_at
from sparrow_megatron.trainer.sparse_attention import SparseRow, sparse_rows, with_sparse_attention
from sparrow_megatron.trainer.weights import (
    export_hf_checkpoint,
    iter_hf_weights,
    iter_stage_hf_weights,
    load_hf_weights,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int, pp: int, cp: int = 1) -> None:
    """Initialise torch.distributed (gloo on CPU, a 1-process group if none) and Megatron's groups."""
    from megatron.core import parallel_state

    compat.apply_cpu_shims()
    if not torch.distributed.is_initialized():
        if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            init, rank, world = "env://", int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            # One process: a private rendezvous. os.environ stays untouched, since child processes
            # (engines, torchrun jobs of tests) would inherit a half-set RANK/WORLD_SIZE.
            init, rank, world = f"tcp://127.0.0.1:{_free_port()}", 0, 1
        backend = "nccl" if compat.HAS_CUDA else "gloo"
        torch.distributed.init_process_group(
            backend,
            init_method=init,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )
        if compat.HAS_CUDA:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = torch.distributed.get_world_size()
    if world % (tp * pp * cp):
        raise UserError(
            f"field 'trainer.tp': tp*pp*cp = {tp * pp * cp} does not divide the world size {world}"
        )
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_context_parallel_world_size() == cp
        )
        if same:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )


@dataclass
class ScoreResult:
    """Per sample: one row per response token."""

    logprobs: list[torch.Tensor]  # [r_i]
    entropy: list[torch.Tensor]  # [r_i]
    topk_ids: list[torch.Tensor] | None  # [r_i, K]
    topk_logprobs: list[torch.Tensor] | None  # [r_i, K]


def _causal_mask(s: int, device: torch.device) -> torch.Tensor:
    """Explicit causal mask (True = masked), for direct model calls in tests; the trainer passes None
    (causal mask type): an [s, s] mask is 1.4 GB at 37K tokens and every recompute checkpoint saves it."""
    return torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1).view(1, 1, s, s)


class Policy:
    """A Megatron-Core Qwen3 policy on this rank's TP/PP/DP slice. Collective: all ranks call alike."""

    def __init__(
        self,
        trainer: TrainerConfig,
        grpo: GRPOConfig | None = None,
        *,
        model_dir: str | Path,
        total_steps: int = 1,
        temperature: float = 1.0,
        top_k_logprobs: int = 20,
        seed: int = 1234,
        pack_sequences: bool = True,
    ):
        """trainer, grpo: the job config's sections. model_dir: a local HF Qwen3 directory; total_steps:
        the LR schedule's horizon (loop.steps); temperature and top_k_logprobs: the rollout's, so that
        scores are of the distribution the engines sampled from. pack_sequences: THD-packed micro-batches
        (False: right-padded rows, which the tests compare against)."""
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads as _finalize

        grpo = grpo if grpo is not None else GRPOConfig()
        problems = trainer.problems() + grpo.problems()
        if not str(model_dir):
            problems.append("model_dir is empty; give a local HF Qwen3 directory")
        if not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if top_k_logprobs < 1:
            problems.append(f"top_k_logprobs must be >= 1, got {top_k_logprobs}")
        if problems:
            raise UserError("invalid trainer settings:\n  " + "\n  ".join(problems))
        self.trainer, self.grpo = trainer, grpo
        self.model_dir = str(model_dir)
        self.total_steps, self.temperature, self.top_k_logprobs = total_steps, temperature, top_k_logprobs
        self.pack_sequences = pack_sequences
        cfg = trainer
        self.arch = read_qwen3_config(self.model_dir)
        check_parallel_split(self.arch, cfg.tp, cfg.pp, source=f"{self.model_dir}/config.json")
        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        # Built first: its checks (CP needs TE, recompute layers per stage) fail before any group is set up.
        self.config = transformer_config(self.arch, cfg.tp, cfg.pp, LongContext.of(cfg), dtype)
        init_distributed(cfg.tp, cfg.pp, cfg.cp)
        torch.manual_seed(seed)
        if compat.HAS_CUDA:
            # GPU init draws from Megatron's per-TP-rank CUDA RNG streams, which must be seeded first.
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        # Dense unless a sparse_rows() context is active (DistillSparse's sparse forward).
        model = build_gpt_model(self.arch, self.config, spec=with_sparse_attention(layer_spec(self.arch)))
        load_hf_weights(model, self.arch, self.model_dir)
        use_dist_opt = compat.HAS_CUDA
        ddp_config = DistributedDataParallelConfig(
            **compat.dataclass_kwargs(
                DistributedDataParallelConfig,
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=use_dist_opt,
            )
        )
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=model)
        # Loss is pre-normalised by global counts, so finalize must sync grads without rescaling them.
        self.config.finalize_model_grads_func = lambda models, num_tokens=None, **kw: _finalize(
            models, None, **compat.supported_kwargs(_finalize, **kw)
        )
        self.optimizer = (
            MegatronOptimizer(self.model, cfg, bf16=dtype == torch.bfloat16)
            if use_dist_opt
            else CpuAdamW(self.model, cfg)
        )
        self.step = 0
        # trainer.async_save: refused here, before any step, where this Megatron-Core cannot do it.
        self._saves = AsyncSaves() if trainer.async_save else None
        self.mini_batch_metrics: list[dict[str, float]] = []  # the last update's, one dict per mini-batch
        self.device = compat.device()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        # SP splits the sequence (packed: the whole pack) over the TP ranks.
        self.pad_to = cfg.tp if self.config.sequence_parallel else 1
        # CP splits each packed sequence into 2 * cp chunks (context_parallel.py).
        self.cp = cfg.cp
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.seq_multiple = (
            sequence_multiple(cfg.cp, cfg.tp, self.config.sequence_parallel) if cfg.cp > 1 else 1
        )

    # ------------------------------------------------------------------ plumbing

    def _micro_batches(
        self, batch: RolloutBatch, packed: bool
    ) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Per DP rank: its sample ids and its micro-batches (same count on every rank)."""
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
        shards = balanced_shards(lengths, self.dp_size)
        budget = self.trainer.micro_batch_tokens
        packs = [pack_micro_batches([lengths[i] for i in s], budget, packed=packed) for s in shards]
        count = max(max(len(p) for p in packs), 1)
        packs = [
            pack_micro_batches([lengths[i] for i in s], budget, min_count=count, packed=packed)
            for s in shards
        ]
        return shards, [
            [[shard[j] for j in mb] for mb in pack] for shard, pack in zip(shards, packs, strict=True)
        ]

    def _build_micro_batches(self, batch: RolloutBatch, sparse: bool) -> list[MicroBatch]:
        """This DP rank's micro-batches; a sparse forward attends per row, so it gets padded rows."""
        if sparse and self.cp > 1:
            raise UserError(
                "DistillSparse's sparse forward runs without context parallelism: set trainer.cp=1"
            )
        packed = (self.pack_sequences or self.cp > 1) and not sparse  # CP splits THD packs only
        _, packs = self._micro_batches(batch, packed)
        return [
            build_micro_batch(batch, ids, pad_to=self.pad_to, packed=packed, seq_multiple=self.seq_multiple)
            for ids in packs[self.dp_rank]
        ]

    def _run(self, micro_batches: list[MicroBatch], loss_fn, forward_only: bool, rows_of=None) -> list[dict]:
        """rows_of: optional MicroBatch -> [SparseRow per row] for a sparse forward (DistillSparse)."""
        from megatron.core.packed_seq_params import PackedSeqParams
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[MicroBatch], model):
            mb = next(data_iterator)
            dev = self.device
            packed = None
            if mb.packed:
                cu = mb.cu_seqlens.to(dev)
                padded = {}
                if mb.cu_seqlens_padded is not None:  # global bounds; TE splits them per CP rank itself
                    cu_pad = mb.cu_seqlens_padded.to(dev)
                    padded = dict(cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad)
                packed = PackedSeqParams(
                    qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                    max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen, **padded,
                )  # fmt: skip
                if self.cp > 1:  # this CP rank's chunks; the loss sees its tokens only
                    mb = local_micro_batch(mb, self.cp, self.cp_rank)
            with sparse_rows(rows_of(mb) if rows_of is not None else None):
                # attention_mask=None: causal mask type, no [s, s] tensor (TE, SDPA and the sparse path).
                output = model(mb.tokens.to(dev), mb.position_ids.to(dev), None, packed_seq_params=packed)
            return output, lambda out, mb=mb: loss_fn(mb, out)

        fwd_bwd = get_forward_backward_func()
        return fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=max(mb.seq_len for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )

    def _token_stats(self, mb: MicroBatch, logits: torch.Tensor, top_k: int = 0, with_entropy: bool = True):
        """Chunked stats of every response token of mb from its [b, s, V/tp] logits; and the per-sample
        token counts."""
        targets = torch.cat(mb.targets) if mb.targets else torch.zeros(0, dtype=torch.long)
        stats = token_stats(
            logits, mb.flat_target_index(), targets, temperature=self.temperature,
            chunk_tokens=self.trainer.logprob_chunk_tokens, with_entropy=with_entropy, top_k=top_k,
        )  # fmt: skip
        return stats, [len(t) for t in mb.targets]

    def _pp_broadcast(self, obj):
        """Send a Python object from the last pipeline stage to every stage."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return obj
        group = parallel_state.get_pipeline_model_parallel_group()
        src = torch.distributed.get_process_group_ranks(group)[-1]
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def _dp_gather(self, obj) -> list:
        """From every data-parallel rank, and every CP rank (each scored a share of the tokens)."""
        from megatron.core import parallel_state

        size = self.dp_size * self.cp
        if size == 1:
            return [obj]
        out = [None] * size
        group = parallel_state.get_data_parallel_group(with_context_parallel=self.cp > 1)
        torch.distributed.all_gather_object(out, obj, group=group)
        return out

    # ------------------------------------------------------------------ scoring

    def sparse_rows_of(self, batch: RolloutBatch, schedules):
        """schedules (one Schedule or None per sample, or None) -> MicroBatch -> its SparseRows."""
        if schedules is None:
            return None
        if len(schedules) != len(batch):
            raise UserError(f"sparse forward: {len(schedules)} schedules for a batch of {len(batch)} samples")

        def rows_of(mb: MicroBatch) -> list[SparseRow]:
            if not mb.sample_ids:  # the padding micro-batch of an empty DP shard
                return [SparseRow.from_schedule(None, 0, mb.seq_len)]
            return [
                SparseRow.from_schedule(schedules[i], len(batch.prompt_ids[i]), mb.seq_len)
                for i in mb.sample_ids
            ]

        return rows_of

    @torch.no_grad()
    def score(self, batch: RolloutBatch, top_k: int | None = None, schedules=None) -> ScoreResult:
        """Dense log-probs and entropy of every response token (temperature applied), plus the top-K
        ids/log-probs (K = top_k_logprobs; pass top_k=0 to skip). Same result on every rank.
        schedules: one `Schedule` (or None = dense) per sample for the sparse forward of the rollout."""
        batch.validate(self.arch.vocab_size, need_training_fields=False)
        k = self.top_k_logprobs if top_k is None else top_k
        self.model.eval()
        mbs = self._build_micro_batches(batch, sparse=schedules is not None)

        def loss_fn(mb: MicroBatch, logits: torch.Tensor):
            stats, sizes = self._token_stats(mb, logits, top_k=k)
            out = {
                "ids": mb.sample_ids,
                "sub": mb.target_subset,  # None: every token of each sample
                "lp": stats.logprobs.cpu().split(sizes),
                "ent": stats.entropy.cpu().split(sizes),
            }
            if k > 0:
                out["topk_ids"] = stats.topk_ids.cpu().split(sizes)
                out["topk_lp"] = stats.topk_logprobs.cpu().split(sizes)
            return torch.zeros((), device=logits.device), torch.tensor(sum(sizes)), out

        results = self._run(mbs, loss_fn, forward_only=True, rows_of=self.sparse_rows_of(batch, schedules))
        results = self._pp_broadcast(results)
        merged: dict[int, tuple] = {}
        fields = ("lp", "ent", "topk_ids", "topk_lp") if k > 0 else ("lp", "ent")
        pieces: dict[str, list] = {f: [] for f in fields}
        for part in self._dp_gather(results):
            for out in part:
                for j, sid in enumerate(out["ids"]):
                    index = out["sub"][j] if out["sub"] is not None else slice(None)
                    for f in fields:
                        pieces[f].append((sid, index, out[f][j]))
        lengths = {i: len(r) for i, r in enumerate(batch.response_ids)}
        # CP ranks each hold some tokens of a sample; without CP a sample comes back whole.
        by_field = {f: merge_token_parts(lengths, pieces[f]) for f in fields}
        for sid in by_field["lp"]:
            merged[sid] = tuple(
                by_field[f][sid] if f in by_field else None for f in ("lp", "ent", "topk_ids", "topk_lp")
            )
        n = len(batch)
        return ScoreResult(
            logprobs=[merged[i][0] for i in range(n)],
            entropy=[merged[i][1] for i in range(n)],
            topk_ids=[merged[i][2] for i in range(n)] if k > 0 else None,
            topk_logprobs=[merged[i][3] for i in range(n)] if k > 0 else None,
        )

    # ------------------------------------------------------------------ training

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One RL step on the whole batch: grpo.mini_batches optimizer steps, each on one mini-batch
        (GRPO groups kept whole, all its micro-batches, all DP ranks). If batch.old_logprobs is None it
        is filled with the dense recompute (score) first, so every mini-batch's ratio is against the
        policy that the step started from."""
        cfg = self.grpo
        batch.validate(self.arch.vocab_size, need_training_fields=True)
        if batch.old_logprobs is None:
            batch.old_logprobs = self.score(batch, top_k=0).logprobs
        if cfg.kl_coef > 0 and batch.ref_logprobs is None:
            raise UserError("grpo.kl_coef > 0 needs batch.ref_logprobs (frozen reference log-probs)")
        coefs = GRPOCoefs(cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.tis_cap, cfg.kl_coef)
        lr = lr_at(self.trainer, self.step, self.total_steps)  # the schedule moves once per RL step

        def update(sub: RolloutBatch, _ids: list[int]):
            masks, weights = self.loss_masks_and_weights(sub)
            self.model.train()
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            results, num_mbs = self.grpo_backward(sub, coefs, masks, weights)
            return results, num_mbs, self.optimizer.step(lr)

        out = self.mini_batch_updates(batch, update)
        self.step += 1
        out["lr"] = lr
        return out

    def mini_batch_updates(self, batch: RolloutBatch, update) -> dict[str, float]:
        """Run update(sub_batch, its sample ids) -> (results, micro-batch count, grad norm) once per mini-batch and merge
        the metrics: token averages over the whole step, loss and grad_norm averaged over mini-batches,
        extremes over all. `self.mini_batch_metrics` keeps each mini-batch's own (for tests and logs)."""
        parts = split_mini_batches(
            batch.group_ids if batch.group_ids is not None else range(len(batch)), self.grpo.mini_batches
        )
        total: dict[str, float] = {}
        per_mb, norms, num_mbs = [], [], 0
        for ids in parts:
            results, n, grad_norm = update(batch.subset(ids), ids)
            summed = self.reduce_metrics(results)
            per_mb.append({**_per_token(summed), "grad_norm": grad_norm})
            total = _merge_metrics(total, summed)
            norms.append(grad_norm)
            num_mbs += n
        self.mini_batch_metrics = per_mb
        out = _per_token(total)
        out["loss"] = total.get("loss", 0.0) / len(parts)  # each mini-batch's loss is its own mean
        out.update(
            grad_norm=sum(norms) / len(norms),
            num_tokens=max(total.get("tokens", 0.0), 1.0),
            num_micro_batches=float(num_mbs),
            num_mini_batches=float(len(parts)),
        )
        return out

    def loss_masks_and_weights(self, batch: RolloutBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per sample: the 0/1 loss mask and the per-token weights carrying the global aggregation."""
        n = len(batch)
        masks = [
            torch.as_tensor(batch.response_masks[i], dtype=torch.float64)
            if batch.response_masks is not None
            else torch.ones(len(batch.response_ids[i]), dtype=torch.float64)
            for i in range(n)
        ]
        lengths = [int(m.sum()) for m in masks]
        weights = token_weights(lengths, self.grpo.loss_agg, sum(lengths), sum(1 for x in lengths if x > 0))
        # token_weights gives one weight per counted token; spread it over the mask.
        return masks, [m * (w[0] if len(w) else 0.0) for m, w in zip(masks, weights, strict=True)]

    def grpo_backward(self, batch: RolloutBatch, coefs: GRPOCoefs, masks, weights, rows_of=None):
        """Forward + backward of the GRPO loss over all micro-batches (grads accumulate where they
        are enabled); returns the per-micro-batch metric sums and the micro-batch count. rows_of:
        the sparse forward (see `_run`)."""
        mbs = self._build_micro_batches(batch, sparse=rows_of is not None)

        def loss_fn(mb: MicroBatch, logits: torch.Tensor):
            stats, _ = self._token_stats(mb, logits)
            dev = logits.device
            ids = mb.sample_ids

            def cat(rows, dtype=torch.float32):
                if not rows:
                    return torch.zeros(0, dtype=dtype, device=dev)
                return torch.cat([torch.as_tensor(r, dtype=dtype) for r in rows]).to(dev)

            def cat(rows, dtype=torch.float32, cat=cat):  # a CP rank keeps its own tokens of each sample
                if mb.target_subset is not None:
                    rows = [torch.as_tensor(r)[sub] for r, sub in zip(rows, mb.target_subset, strict=True)]
                return cat(rows, dtype)

            old = cat([batch.old_logprobs[i] for i in ids])
            roll = cat([batch.rollout_logprobs[i] for i in ids])
            adv = cat([torch.full((len(batch.response_ids[i]),), float(batch.advantages[i])) for i in ids])
            ref = cat([batch.ref_logprobs[i] for i in ids]) if batch.ref_logprobs is not None else None
            w = cat([weights[i] for i in ids], dtype=torch.float64)
            mask = cat([masks[i] for i in ids])
            tok_loss, st = grpo_token_loss(stats.logprobs, old, roll, adv, coefs, ref)
            loss = (tok_loss.double() * w).sum().float()
            count = mask.sum()
            summed = {"clip_frac": st["clip_frac"], "clip_frac_low": st["clip_frac_low"],
                      "clip_frac_high": st["clip_frac_high"], "approx_kl": st["approx_kl"],
                      "ratio_mean": st["ratio"], "dual_clip_frac": st["dual_clip_frac"],
                      "tis_weight_mean": st["tis_weight"], "tis_clipped_frac": st["tis_clipped"],
                      "kl": st["kl"], "entropy": stats.entropy.detach()}  # fmt: skip
            on_device = {
                "loss": loss.detach(),
                "tokens": count,
                **{name: (x * mask).sum() for name, x in summed.items()},
                "ratio_max": _masked_extreme(st["ratio"], mask, max),
                "ratio_min": _masked_extreme(st["ratio"], mask, min),
                "tis_weight_max": _masked_extreme(st["tis_weight"], mask, max),
            }
            # One device->host copy per micro-batch for every metric, not one sync each.
            metrics = dict(
                zip(on_device, torch.stack([v.double() for v in on_device.values()]).cpu(), strict=True)
            )
            return loss, torch.tensor(int(count.item()), dtype=torch.int), metrics

        return self._run(mbs, loss_fn, forward_only=False, rows_of=rows_of), len(mbs)

    def reduce_metrics(self, results: list[dict]) -> dict[str, float]:
        """Sum (extremes: max / min) the micro-batch metrics over micro-batches, PP stages and DP ranks."""
        local: dict[str, float] = {}
        for r in results or []:
            local = _merge_metrics(local, {k: float(v) for k, v in r.items()})
        local = self._pp_broadcast(local)
        merged: dict[str, float] = {}
        for part in self._dp_gather(local):
            merged = _merge_metrics(merged, part)
        return merged

    # ------------------------------------------------------------------ weights and checkpoints

    def iter_hf_weights(self, bucket_bytes: int = 512 << 20, to_host: bool = True, stage_relay=None):
        """Collective generator of lists of (hf_name, full tensor) for weight sync to the rollout;
        to_host=False keeps the tensors on the GPU (the distributed broadcast).
        stage_relay (the distributed sync under PP, from rank 0's fleet): each stage's weights stay on
        their stage; rank 0 gets stage 0's buckets, each other stage's sender (TP rank 0, DP rank 0)
        broadcasts its own to the engines while draining the returned (empty) iterator."""
        if stage_relay is None:
            return iter_hf_weights(self.model, self.arch, bucket_bytes, to_host=to_host)
        from megatron.core import parallel_state

        from sparrow_megatron.rollout.stage_relay import follow_stage

        local = iter_stage_hf_weights(self.model, self.arch, bucket_bytes)
        if torch.distributed.get_rank() == 0:
            return local
        is_sender = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        )
        stage = parallel_state.get_pipeline_model_parallel_rank()
        return follow_stage(local, stage_relay, stage, is_sender)

    def hf_grads(self) -> dict[str, torch.Tensor]:
        """The last step's accumulated gradients, full and under HF names (collective; for checks)."""
        return {n: t for bucket in iter_hf_weights(self.model, self.arch, grads=True) for n, t in bucket}

    def export_hf(
        self, out_dir: str | Path, max_shard_bytes: int = 4 << 30, dtype: torch.dtype | None = None
    ) -> Path | None:
        """Write an HF safetensors checkpoint of the current weights (rank 0 writes; collective).
        dtype: cast on export (e.g. torch.bfloat16); default keeps the training dtype."""
        out = export_hf_checkpoint(self.model, self.arch, self.model_dir, out_dir, max_shard_bytes, dtype)
        torch.distributed.barrier()
        return out

    def save_checkpoint(self, ckpt_dir: str | Path, step: int | None = None, extra_state: dict | None = None):
        """Collective. Under trainer.async_save the save completes in `finalize_checkpoints`."""
        step = self.step if step is None else step
        return save_checkpoint(self, Path(ckpt_dir), step, extra_state or {}, self._saves)

    def finalize_checkpoints(self, blocking: bool = False) -> list[str]:
        """Collective. Finalize the async saves every rank has written (blocking: all, waiting); returns
        the checkpoint directories completed since the last call, oldest first."""
        if self._saves is None:
            return []
        self._saves.finalize(blocking)
        return self._saves.take_finished()

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict:
        """Restore model, optimizer, step and RNG; returns the extra_state given at save time."""
        if self._saves is not None:
            self._saves.finalize(blocking=True)  # a save in flight may be the one asked for
        return load_checkpoint(self, Path(ckpt_dir))


def _masked_extreme(values: torch.Tensor, mask: torch.Tensor, which) -> torch.Tensor:
    """max or min of values over the tokens in the loss; -inf / +inf when there are none (the neutral
    element of the merge). A masked reduction, not boolean indexing: no host sync."""
    neutral = float("-inf") if which is max else float("inf")
    if values.numel() == 0:  # a shape, known on the host
        return torch.tensor(neutral, dtype=torch.float64, device=values.device)
    kept = torch.where(mask > 0, values.detach().double(), neutral)
    return kept.max() if which is max else kept.min()


def _merge_metrics(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Metric sums add; `*_max` keys take the max and `*_min` keys the min."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif k.endswith("_max"):
            out[k] = max(out[k], v)
        elif k.endswith("_min"):
            out[k] = min(out[k], v)
        else:
            out[k] = out[k] + v
    return out


def _per_token(summed: dict[str, float]) -> dict[str, float]:
    """Token sums -> per-token means; the loss (already normalised) and the extremes as they are. An
    extreme over no tokens at all reads 1.0 (ratio and TIS weight of an empty batch)."""
    tokens = max(summed.get("tokens", 0.0), 1.0)
    out = {}
    for k, v in summed.items():
        if k == "tokens":
            continue
        if k.endswith(("_max", "_min")):
            out[k] = v if abs(v) != float("inf") else 1.0
        else:
            out[k] = v if k == "loss" else v / tokens
    return out
