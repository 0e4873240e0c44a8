"""DistillSparse: train the sparse rollout's LoRA adapter toward the dense policy, so the
sparse rollout's acceptance tail rises and a cheaper schedule becomes safe.

After the base update of a step, with the base frozen, on the same rollout:

    loss = TIS-weighted PPO term of pi_sparse+phi  +  kl_lambda * KL(pi_sparse+phi || pi_dense)

pi_sparse+phi is the policy's sparse forward (`Policy.score(schedules=...)`: the rollout's page selection
and budgets at every position) with the adapter on. The PPO ratio is taken against the sparse+adapter
log-probs recomputed before this update (so the first step is on-policy) and the TIS weight
min(exp(old - rollout), C) corrects the engine/trainer mismatch, exactly as the dense GRPO term does. The
KL is the k3 estimator on the sampled tokens, exp(d) - d - 1 with d = logp_dense - logp_sparse+phi,
unbiased for KL(sparse || dense) when the tokens come from the sparse policy (they do: the sparse rollout
sampled them); the dense log-probs are those already computed for the base update (a free teacher).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.trainer.batch import RolloutBatch
from sparrow_megatron.trainer.grpo import GRPOCoefs
from sparrow_megatron.trainer.lora import LoraAdapter, LoraSpec

FORMAT = "sparrow-megatron-distill-state/2"
STATE_FILE = "adapter_state.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def training_schedule(
    schedule: Schedule | None, budget_mode: str = "replay", fixed_budget: int | None = None
):
    """The schedule the adapter trains under: the rollout's (replay, exact per position) or one fixed
    budget at every position (fixed; None = the schedule's largest budget), same geometry and dense
    layers. A dense rollout (None) stays dense."""
    if schedule is None or budget_mode == "replay":
        return schedule
    if budget_mode != "fixed":
        raise UserError(f"distill.budget_mode must be 'replay' or 'fixed', got {budget_mode!r}")
    if fixed_budget is None:
        fixed_budget = max((b for b in schedule.budgets if b is not None), default=None)
    return Schedule.fixed(
        fixed_budget,
        bin_width=schedule.bin_width,
        geometry=schedule.geometry,
        dense_layers=schedule.dense_layers,
        name=f"{schedule.name}/fixed-{fixed_budget}",
    )


class SparseDistiller:
    """The adapter, its optimizer and the distill step, on top of a `Policy` (collective like it)."""

    def __init__(
        self,
        policy,
        spec: LoraSpec,
        kl_lambda: float = 1e-3,
        lr: float = 1e-4,
        tis_cap: float | None = None,
        budget_mode: str = "replay",
        fixed_budget: int | None = None,
    ):
        if kl_lambda < 0:
            raise UserError(f"distill.kl_lambda must be >= 0, got {kl_lambda}")
        if lr <= 0:
            raise UserError(f"distill.lr must be > 0, got {lr}")
        self.policy = policy
        self.kl_lambda = kl_lambda
        self.lr = lr
        # The phase's own TIS cap (None: off), not grpo.tis_cap: the reference keeps the two apart.
        self.tis_cap = tis_cap
        self.budget_mode, self.fixed_budget = budget_mode, fixed_budget
        training_schedule(None, budget_mode)  # refuse an unknown mode here, not at the first step
        self.adapter = LoraAdapter(policy.model, policy.arch, spec, policy.config)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=lr, weight_decay=0.0)
        self.step_count = 0

    @contextlib.contextmanager
    def _base_frozen(self) -> Iterator[None]:
        params = list(self.policy.model.parameters())
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, r in zip(params, saved, strict=True):
                p.requires_grad_(r)

    def score(self, batch: RolloutBatch, schedules: Sequence[Schedule | None], top_k: int = 0, adapter=True):
        """Log-probs of the sparse rollout policy (with or without the adapter) on a batch."""
        with self.adapter.enabled(adapter):
            return self.policy.score(batch, top_k=top_k, schedules=schedules)

    def step(
        self,
        batch: RolloutBatch,
        dense_logprobs: Sequence[torch.Tensor],
        schedules: Sequence[Schedule | None],
    ) -> dict[str, float]:
        """One adapter update on the rollout batch (base frozen). dense_logprobs: the dense policy's
        log-probs of the response tokens (the teacher). Returns metrics (kl is the mean k3 term)."""
        policy = self.policy
        batch.validate(policy.arch.vocab_size, need_training_fields=True)
        if len(dense_logprobs) != len(batch):
            raise UserError(
                f"distill: {len(dense_logprobs)} rows of dense log-probs for {len(batch)} samples"
            )
        for i, (r, lp) in enumerate(zip(batch.response_ids, dense_logprobs, strict=True)):
            if len(lp) != len(r):
                raise UserError(
                    f"distill: sample {i} has {len(r)} response tokens but {len(lp)} dense log-probs"
                )
        # The PPO ratio's old log-probs come from the same sparse forward the adapter trains under.
        schedules = [training_schedule(s, self.budget_mode, self.fixed_budget) for s in schedules]
        old = self.score(batch, schedules).logprobs
        work = dataclasses.replace(
            batch, old_logprobs=old, ref_logprobs=[torch.as_tensor(x) for x in dense_logprobs]
        )
        g = policy.grpo
        coefs = GRPOCoefs(g.eps_low, g.eps_high, g.dual_clip, self.tis_cap, kl_coef=self.kl_lambda)
        policy.model.train()

        # grpo.mini_batches applies here too: the same group-whole mini-batches as the base update, one
        # adapter AdamW step each, every ratio against the sparse+adapter log-probs taken above.
        def update(sub: RolloutBatch, ids: list[int]):
            masks, weights = policy.loss_masks_and_weights(sub)
            self.optimizer.zero_grad(set_to_none=True)
            rows_of = policy.sparse_rows_of(sub, [schedules[i] for i in ids])
            with self._base_frozen(), self.adapter.enabled():
                results, num_mbs = policy.grpo_backward(sub, coefs, masks, weights, rows_of=rows_of)
            # The DDP buffers of the frozen base only saw Megatron's finalize on zeros; keep them clean.
            policy.model.zero_grad_buffer()
            self.adapter.sync_grads()
            grad_norm = self.adapter.grad_norm()
            clip = policy.trainer.grad_clip
            if clip > 0 and grad_norm > clip:
                for p in self.adapter.parameters():
                    p.grad.mul_(clip / (grad_norm + 1e-6))
            self.optimizer.step()
            return results, num_mbs, grad_norm

        out = policy.mini_batch_updates(work, update)
        self.step_count += 1
        out["lr"] = self.lr
        return out

    @torch.no_grad()
    def probe_acceptance(
        self, probe: RolloutBatch, schedules: Sequence[Schedule | None], top_k: int = 20
    ) -> dict[str, float]:
        """Acceptance of the sparse policy against the dense one on a fixed probe batch, without and
        with the adapter, from top-K lists as in production (`acceptance_from_topk` estimate): the
        5th percentile over tokens (the tail the schedule is held to) and the mean."""
        from sparrow_megatron.sparsity.acceptance import acceptance_from_topk

        dense = self.policy.score(probe, top_k=top_k)
        out: dict[str, float] = {}
        for name, on in (("base", False), ("adapter", True)):
            sparse = self.score(probe, schedules, top_k=top_k, adapter=on)
            alpha = acceptance_from_topk(
                torch.cat(dense.topk_ids),
                torch.cat(dense.topk_logprobs),
                torch.cat(sparse.topk_ids),
                torch.cat(sparse.topk_logprobs),
            )[0].double()
            alpha = alpha[~alpha.isnan()]
            out[f"probe_p5_{name}"] = float(torch.quantile(alpha, 0.05)) if len(alpha) else float("nan")
            out[f"probe_mean_{name}"] = float(alpha.mean()) if len(alpha) else float("nan")
        return out

    def export(self, out_dir: str | Path) -> Path | None:
        """The adapter in PEFT format (collective; global rank 0 writes)."""
        return self.adapter.export_peft(out_dir, base_model_path=self.policy.model_dir)

    # Checkpoints hold the adapter and its AdamW moments in a form that does not depend on TP x PP, so a
    # run resumes under another layout (the adapter is small: gathering it is cheap).
    def save(self, path: str | Path) -> None:
        """Collective; global rank 0 writes `adapter_state.pt` under path."""
        state = self.optimizer.state
        moments = {m: self.adapter.full_tensors(lambda p, m=m: state[p][m]) for m in MOMENTS if state}
        params = self.adapter.full_tensors()
        if torch.distributed.get_rank() == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            adam_step = float(next(iter(state.values()))["step"]) if state else 0.0
            saved = {"format": FORMAT, "steps": self.step_count, "adam_step": adam_step, "params": params}
            tmp = Path(path) / (STATE_FILE + ".tmp")
            torch.save({**saved, **moments}, tmp)
            tmp.replace(Path(path) / STATE_FILE)
        torch.distributed.barrier()

    def load(self, path: str | Path) -> None:
        """Collective: restore what `save` wrote, under this run's TP x PP."""
        file = Path(path) / STATE_FILE
        if not file.is_file():
            raise UserError(f"{file}: missing (a checkpoint saved without distill, or by an older version)")
        try:
            saved = torch.load(file, weights_only=True)
        except Exception as exc:  # truncated or not a torch file
            raise UserError(
                f"{file}: cannot read the DistillSparse state ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            raise UserError(f"{file}: field 'format' is {found!r}, expected {FORMAT!r}")
        with torch.no_grad():
            for param, shard in self.adapter.local_shards(saved["params"], str(file)):
                param.copy_(shard)
        self.optimizer.state.clear()
        if all(m in saved for m in MOMENTS):
            shards = {m: dict(self.adapter.local_shards(saved[m], str(file))) for m in MOMENTS}
            for param in shards[MOMENTS[0]]:
                self.optimizer.state[param] = {
                    "step": torch.tensor(float(saved["adam_step"]), dtype=torch.float32),
                    **{m: shards[m][param] for m in MOMENTS},
                }
        self.step_count = int(saved["steps"])
        torch.distributed.barrier()
