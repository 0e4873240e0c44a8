"""Kill-and-resume equals an uninterrupted run, also under another TP x PP; partial, corrupt or foreign
checkpoints are refused clearly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer import Policy, RolloutBatch
from sparrow_megatron.trainer.checkpoint import MANIFEST
from tests.trainer.policy_args import make_policy


def _batch(seed: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [torch.randint(5, 120, (n,), generator=g).tolist() for n in (5, 3, 7)]
    rollout = [(-4.8 + 0.5 * torch.randn(len(r), generator=g)).tolist() for r in responses]
    return RolloutBatch(prompts, responses, rollout, advantages=[1.0, -0.5, -0.5])


def _policy(model_dir, **kw):
    return make_policy(
        model_dir, lr=1e-3, warmup_steps=2, lr_schedule="cosine", total_steps=10, weight_decay=0.01,
        micro_batch_tokens=20, **kw,
    )  # fmt: skip


def _params(policy) -> dict:
    return {n: p.detach().clone() for n, p in policy.model.module.named_parameters()}


def test_resume_gives_the_same_next_step_as_an_uninterrupted_run(tiny_tied, tmp_path):
    run = _policy(tiny_tied)
    run.train_step(_batch(0))
    run.train_step(_batch(1))
    run.save_checkpoint(tmp_path / "step2", extra_state={"cursor": 17})
    rng_after_save = torch.rand(4)
    expected = run.train_step(_batch(2))
    expected_params = _params(run)

    # A fresh process-equivalent: rebuild from the HF weights, then resume.
    resumed = _policy(tiny_tied)
    extra = resumed.load_checkpoint(tmp_path / "step2")
    assert extra == {"cursor": 17} and resumed.step == 2
    assert torch.equal(torch.rand(4), rng_after_save)
    got = resumed.train_step(_batch(2))
    assert got == expected  # same loss, grad norm, lr (warmup/cosine position), metrics: exactly
    for name, p in _params(resumed).items():
        assert torch.equal(p, expected_params[name]), name
    assert (tmp_path / "step2" / MANIFEST).is_file()


def test_an_async_save_resumes_like_the_synchronous_one(tiny_tied, tmp_path):
    """trainer.async_save: the shards are written in the background while training goes on; after the
    finalize the checkpoint holds the state of the save step (not of later steps) and resumes exactly as
    the synchronous save of the same state does."""
    run = _policy(tiny_tied, async_save=True)
    run.train_step(_batch(0))
    run.train_step(_batch(1))
    run.save_checkpoint(tmp_path / "async", extra_state={"cursor": 17})
    assert not (tmp_path / "async" / MANIFEST).exists()  # written only by the finalize
    rng_after_save = torch.rand(4)
    expected = run.train_step(_batch(2))  # updates the parameters in place while the save is in flight
    expected_params = _params(run)
    assert run.finalize_checkpoints(blocking=True) == [str(tmp_path / "async")]
    assert run.finalize_checkpoints(blocking=True) == []  # reported once
    manifest = json.loads((tmp_path / "async" / MANIFEST).read_text())
    assert manifest["step"] == 2 and manifest["trainer_step"] == 2 and "rng/rank0.pt" in manifest["files"]

    sync = _policy(tiny_tied)
    sync.train_step(_batch(0))
    sync.train_step(_batch(1))
    sync.save_checkpoint(tmp_path / "sync", extra_state={"cursor": 17})

    results, params = [], []
    for ckpt in ("async", "sync"):
        resumed = _policy(tiny_tied)
        assert resumed.load_checkpoint(tmp_path / ckpt) == {"cursor": 17} and resumed.step == 2
        assert torch.equal(torch.rand(4), rng_after_save)
        results.append(resumed.train_step(_batch(2)))
        params.append(_params(resumed))
    assert results[0] == results[1] == expected
    for name, p in expected_params.items():
        assert torch.equal(params[0][name], p) and torch.equal(params[1][name], p), name


def test_an_async_save_without_its_finalize_is_refused(tiny_tied, tmp_path):
    """Killed between the background write and the finalize: no manifest, so resume refuses it."""
    policy = _policy(tiny_tied, async_save=True)
    policy.train_step(_batch(0))
    policy.save_checkpoint(tmp_path / "ckpt")
    # What a kill leaves: whatever the writer wrote so far, never the manifest.
    shutil.copytree(tmp_path / "ckpt", tmp_path / "killed")
    other = _policy(tiny_tied)
    with pytest.raises(UserError, match="incomplete checkpoint"):
        other.load_checkpoint(tmp_path / "killed")
    # A new save waits for (and finalizes) the one in flight first: one host snapshot at a time.
    policy.save_checkpoint(tmp_path / "next")
    assert (tmp_path / "ckpt" / MANIFEST).is_file() and not (tmp_path / "next" / MANIFEST).exists()
    assert policy.finalize_checkpoints(blocking=True) == [str(tmp_path / "ckpt"), str(tmp_path / "next")]
    assert other.load_checkpoint(tmp_path / "ckpt") == {} and other.step == 1


def test_async_save_is_refused_where_megatron_core_cannot(monkeypatch):
    from sparrow_megatron.trainer import async_save

    monkeypatch.setattr(async_save, "unsupported_reason", lambda: "no async save in this megatron-core")
    with pytest.raises(UserError, match="field 'trainer.async_save': no async save in this megatron-core"):
        async_save.AsyncSaves()
    monkeypatch.undo()
    assert async_save.unsupported_reason() is None  # megatron-core 0.16.1 has it


def test_saving_warns_of_no_corrupted_checkpoint(tiny_tied, tmp_path, caplog):
    """dist_checkpointing warns "Overwriting old incomplete / corrupted checkpoint" into a non-empty
    directory: a save (also over an older one) must give it an empty one."""
    policy = _policy(tiny_tied)
    with caplog.at_level("WARNING"):
        policy.save_checkpoint(tmp_path / "ckpt")
        policy.save_checkpoint(tmp_path / "ckpt")
    assert "Overwriting" not in caplog.text
    assert (tmp_path / "ckpt" / "rng" / "rank0.pt").is_file() and (tmp_path / "ckpt" / MANIFEST).is_file()


def test_partial_and_corrupt_checkpoints_are_refused(tiny_tied, tmp_path):
    policy = _policy(tiny_tied)
    policy.train_step(_batch(0))
    ckpt = policy.save_checkpoint(tmp_path / "good", extra_state={})
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["step"] == 1 and manifest["files"]

    # Interrupted save: shards written, manifest missing.
    partial = tmp_path / "partial"
    shutil.copytree(ckpt, partial, ignore=shutil.ignore_patterns(MANIFEST))
    with pytest.raises(UserError, match="incomplete checkpoint"):
        policy.load_checkpoint(partial)

    # Truncated shard.
    shard = next(f for f in ckpt.iterdir() if f.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        policy.load_checkpoint(ckpt)

    with pytest.raises(UserError, match="does not exist"):
        policy.load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="JSON"):
        policy.save_checkpoint(tmp_path / "bad_extra", extra_state={"x": object()})


def test_old_format_and_another_model_are_refused(tiny_tied, tiny_untied, tmp_path):
    policy = _policy(tiny_tied)
    ckpt = policy.save_checkpoint(tmp_path / "tied", extra_state={})
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).write_text(json.dumps({**manifest, "format": "sparrow-megatron-trainer-ckpt/1"}))
    with pytest.raises(UserError, match="field 'format'"):
        policy.load_checkpoint(ckpt)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    assert policy.load_checkpoint(ckpt) == {} and policy.step == 0  # saved before any step: loads
    other = _policy(tiny_untied)  # an untied output layer the checkpoint does not hold
    with pytest.raises(UserError, match="cannot load checkpoint into this model"):
        other.load_checkpoint(ckpt)


def _torchrun(worker_args: list[str], tmp_path) -> None:
    worker = Path(__file__).with_name("resume_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(worker),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd + worker_args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["--tp=2", "--pp=2"])
def test_a_tp2_or_pp2_checkpoint_resumes_in_one_process(tiny_untied, tmp_path, layout):
    """Resharding on resume: the weights come back exactly, and the next step matches the run that
    saved them (reduction order differs across layouts, so within 1e-5)."""
    from safetensors.torch import load_file

    _torchrun(["--model-dir", str(tiny_untied), "--out", str(tmp_path), layout, "--save-only"], tmp_path)
    resumed = make_policy(tiny_untied, lr=1e-3, warmup_steps=1, micro_batch_tokens=20)
    assert resumed.load_checkpoint(tmp_path / "ckpt") == {"cursor": 3} and resumed.step == 1
    resumed.export_hf(tmp_path / "got_saved")
    saved = load_file(tmp_path / "saved_hf" / "model.safetensors")
    for name, t in load_file(tmp_path / "got_saved" / "model.safetensors").items():
        assert torch.equal(t, saved[name]), name
    got = resumed.train_step(_batch(1))  # the worker's batch(1)
    want = torch.load(tmp_path / "expected.pt")
    for key in ("loss", "grad_norm", "lr", "num_tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    resumed.export_hf(tmp_path / "got_next")
    expected = load_file(tmp_path / "expected_hf" / "model.safetensors")
    for name, t in load_file(tmp_path / "got_next" / "model.safetensors").items():
        torch.testing.assert_close(t, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_resume_under_tp2_gives_the_same_next_step(tiny_untied, tmp_path):
    """Saved asynchronously (trainer.async_save): both ranks' background writes, then the collective
    finalize, after a step of training; the resumed step is bit-identical on both ranks."""
    args = ["--model-dir", str(tiny_untied), "--out", str(tmp_path), "--tp", "2", "--async-save"]
    _torchrun(args, tmp_path)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["extra"] == {"cursor": 3}
        assert r["got"] == r["expected"]
        for name, p in r["got_params"].items():
            assert torch.equal(p, r["expected_params"][name]), (rank, name)


# ---------------------------------------------------------------- the GPU branch (distributed optimizer)


class _TorchWithCudaLiteralsOnCpu:
    """`torch` for Megatron optimizer modules whose factory calls say device="cuda" literally."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _cpu(kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def tensor(self, *a, **k):
        return torch.tensor(*a, **self._cpu(k))

    def zeros(self, *a, **k):
        return torch.zeros(*a, **self._cpu(k))

    def empty(self, *a, **k):
        return torch.empty(*a, **self._cpu(k))


@pytest.fixture
def distributed_optimizer_on_cpu(monkeypatch):
    """Test-only: lets Megatron's DistributedOptimizer (the GPU branch) run on CPU with DP=1 by
    redirecting its device="cuda" literals and its `Tensor.type() == 'torch.cuda.FloatTensor'` checks."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as mutils

    for module in (optimizer, distrib_optimizer, clip_grads, mutils):
        monkeypatch.setattr(module, "torch", _TorchWithCudaLiteralsOnCpu())
    cpu_type = torch.Tensor.type

    def cuda_type(self, *a, **k):
        name = cpu_type(self, *a, **k)
        return name if a or k or ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)

    monkeypatch.setattr(torch.Tensor, "type", cuda_type)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


def _with_distributed_optimizer(policy: Policy) -> Policy:
    """What Policy builds when CUDA is present: DDP for the distributed optimizer + MegatronOptimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from sparrow_megatron.trainer.optim import MegatronOptimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    policy.model = DistributedDataParallel(
        config=policy.config, ddp_config=ddp_config, module=policy.model.module
    )
    policy.optimizer = MegatronOptimizer(policy.model, policy.trainer, bf16=False)
    return policy


def test_distributed_optimizer_checkpoint_has_the_cpu_layout(
    tiny_tied, tmp_path, distributed_optimizer_on_cpu
):
    from megatron.core import dist_checkpointing

    cpu = _policy(tiny_tied)
    cpu_metrics = cpu.train_step(_batch(0))
    cpu.save_checkpoint(tmp_path / "cpu")
    gpu_branch = _with_distributed_optimizer(_policy(tiny_tied))
    assert type(gpu_branch.optimizer.opt.chained_optimizers[0]).__name__ == "DistributedOptimizer"
    gpu_metrics = gpu_branch.train_step(_batch(0))
    assert gpu_metrics["grad_norm"] == pytest.approx(cpu_metrics["grad_norm"], rel=1e-6)
    gpu_branch.save_checkpoint(tmp_path / "gpu")

    def saved_tensors(ckpt):
        return {
            k: v for k, v in dist_checkpointing.load_plain_tensors(str(ckpt)).items() if torch.is_tensor(v)
        }

    cpu_saved, gpu_saved = saved_tensors(tmp_path / "cpu"), saved_tensors(tmp_path / "gpu")
    # The same model ShardedTensors and the optimizer moments under the same keys and global shapes as
    # the CPU optimizer's (the distributed one adds its fp32 main params): one layout, reshardable alike.
    assert cpu_saved.keys() <= gpu_saved.keys()
    assert gpu_saved.keys() - cpu_saved.keys() == {
        k for k in gpu_saved if k.startswith("optimizer.state.param.")
    }
    assert any(k.startswith("optimizer.state.exp_avg_sq.decoder.layers.") for k in cpu_saved)
    for key, value in cpu_saved.items():
        # One step from the same weights: the same clipped gradients, moments and weights.
        torch.testing.assert_close(gpu_saved[key], value, rtol=1e-5, atol=1e-8, msg=key)

    # Resuming goes through Megatron's own loader into a never-stepped optimizer (its state is
    # materialised first). megatron-core 0.16.1 cannot load into torch's Adam (no TE/Apex here): refused
    # clearly; the GPU image has TE, whose FusedAdam keeps the step in the param group.
    fresh = _with_distributed_optimizer(_policy(tiny_tied))
    with pytest.raises(UserError, match="needs Transformer Engine or Apex"):
        fresh.load_checkpoint(tmp_path / "gpu")
