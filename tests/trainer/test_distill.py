"""DistillSparse step: base frozen, adapter moves the sparse policy toward the dense one."""

import pytest
import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import PageGeometry
from sparrow_megatron.trainer import Policy, RolloutBatch, TrainerConfig
from sparrow_megatron.trainer.distill import SparseDistiller
from sparrow_megatron.trainer.lora import LoraSpec

SCHEDULE = Schedule.fixed(
    8, geometry=PageGeometry(page_size=4, sink_pages=1, local_pages=1), dense_layers=(0,)
)


def _k3(sparse, dense):
    d = torch.cat(dense) - torch.cat(sparse)
    return float((torch.exp(d) - d - 1).mean())


@pytest.fixture(scope="module")
def setup(tiny_tied):
    policy = Policy(TrainerConfig(model_dir=str(tiny_tied), lr=1e-3, micro_batch_tokens=80, seed=5))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (6, 9, 5)]
    responses = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (30, 24, 27)]
    return policy, prompts, responses


def test_distill_steps_reduce_kl_and_leave_the_base_alone(setup, tmp_path):
    policy, prompts, responses = setup
    schedules = [SCHEDULE] * len(prompts)
    probe = RolloutBatch(prompts, responses)
    distiller = SparseDistiller(policy, LoraSpec(rank=4, alpha=8.0, seed=1), kl_lambda=1.0, lr=3e-3)
    try:
        dense = policy.score(probe, top_k=0).logprobs
        sparse0 = distiller.score(probe, schedules).logprobs
        # B = 0 at init: the adapter starts as a no-op on the sparse policy.
        assert all(
            torch.equal(a, b)
            for a, b in zip(sparse0, distiller.score(probe, schedules, adapter=False).logprobs, strict=True)
        )
        kl0 = _k3(sparse0, dense)
        assert kl0 > 1e-4
        base_before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        # Zero advantages isolate the KL term; the rollout log-probs are the sparse policy's own.
        batch = RolloutBatch(prompts, responses, [x.tolist() for x in sparse0], [0.0] * len(prompts))
        first = distiller.step(batch, dense, schedules)
        assert first["kl"] == pytest.approx(kl0, rel=1e-4)
        assert first["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5) and first["grad_norm"] > 0
        for _ in range(4):
            last = distiller.step(batch, dense, schedules)
        kl = _k3(distiller.score(probe, schedules).logprobs, dense)
        assert kl < 0.7 * kl0, (kl0, kl)
        assert last["kl"] < first["kl"]
        for n, p in policy.model.named_parameters():
            assert torch.equal(p, base_before[n]), n
        # The dense policy never sees the adapter.
        assert all(
            torch.equal(a, b) for a, b in zip(policy.score(probe, top_k=0).logprobs, dense, strict=True)
        )
        # The base still trains after a distill step (its grads were not left disabled).
        metrics = policy.train_step(
            RolloutBatch(prompts, responses, [x.tolist() for x in dense], [1.0, -1.0, 0.5])
        )
        assert metrics["grad_norm"] > 0
        out = distiller.export(tmp_path / "adapter")
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    finally:
        distiller.adapter.remove()


def test_distill_rejects_mismatched_dense_logprobs(setup):
    policy, prompts, responses = setup
    distiller = SparseDistiller(policy, LoraSpec(rank=2, alpha=4.0))
    try:
        batch = RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], [0.0] * len(prompts))
        bad = [torch.zeros(len(r)) for r in responses]
        bad[1] = bad[1][:-1]
        with pytest.raises(UserError, match="sample 1"):
            distiller.step(batch, bad, [SCHEDULE] * len(prompts))
    finally:
        distiller.adapter.remove()
