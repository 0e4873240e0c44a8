"""Loop checkpoints under trainer.async_save (real Megatron-Core policy, real run directory): a step's
checkpoint is committed only once its background save is finalized, a kill before that leaves the
previous checkpoint as the resume point, and a stop request commits the checkpoint before exit 75."""

from __future__ import annotations

import os

import pytest
import torch

from sparrow_megatron.launch.contract import SAVED_FILE, STOP_FILE
from sparrow_megatron.loop.checkpointing import CheckpointCommits, at_step_boundary
from sparrow_megatron.loop.preempt import EXIT_REQUEUE, Preempted, StepBoundary, StopRequest
from sparrow_megatron.loop.rundir import COMPLETE_MARKER, RunDir
from sparrow_megatron.trainer import RolloutBatch
from sparrow_megatron.trainer.checkpoint import MANIFEST
from tests.trainer.policy_args import make_policy

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sparrow_megatron.models.tiny import TinyQwen3Shape, make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny"), TinyQwen3Shape(), seed=0)


def _batch(seed: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    responses = [torch.randint(5, 120, (n,), generator=g).tolist() for n in (5, 3)]
    rollout = [(-4.8 + 0.5 * torch.randn(len(r), generator=g)).tolist() for r in responses]
    return RolloutBatch([[5, 6, 7], [8, 9]], responses, rollout, advantages=[1.0, -1.0])


def _saver(run: RunDir, policy):
    """The loop's checkpoint: the policy's save plus the loop's own files, into step_N.partial."""

    def save(step: int):
        path = run.begin_checkpoint(step)
        policy.save_checkpoint(path / "policy", step=step)
        RunDir.write_loop_state(path, {"step": step})
        return path / "policy"

    return save


def test_a_kill_before_the_finalize_resumes_from_the_previous_checkpoint(tiny, tmp_path):
    run = RunDir(tmp_path / "run").create()
    policy = make_policy(tiny, lr=1e-3, async_save=True)
    commits = CheckpointCommits(policy, run, async_save=True)
    boundary = StepBoundary(StopRequest(run.root), last_step=10, every=2, every_s=0)
    save = _saver(run, policy)
    for step in range(1, 5):
        policy.train_step(_batch(step))
        at_step_boundary(step, boundary, commits, save)
    # Step 4's save is in flight (it is finalized at a later boundary): a kill now leaves step_4.partial
    # without the policy's manifest, and resume takes step 2, which step 4's boundary committed.
    assert commits.pending and [c.step for c in run.list_checkpoints()] == [2]
    assert not (run.checkpoints / "step_4.partial" / "policy" / MANIFEST).exists()
    assert RunDir(run.root).prepare_resume().step == 2
    assert (run.checkpoint_dir(2) / "policy" / MANIFEST).is_file()

    commits.wait()  # the run goes on instead: step 4 becomes complete
    assert not commits.pending and [c.step for c in run.list_checkpoints()] == [2, 4]
    resumed = make_policy(tiny, lr=1e-3)
    resumed.load_checkpoint(run.checkpoint_dir(4) / "policy")
    assert resumed.step == 4 and RunDir.read_loop_state(run.checkpoint_dir(4)) == {"step": 4}


@pytest.mark.parametrize("async_save", [False, True])
def test_a_stop_request_commits_the_checkpoint_before_the_requeue_exit(tiny, tmp_path, async_save):
    run = RunDir(tmp_path / "run").create()
    policy = make_policy(tiny, lr=1e-3, async_save=async_save)
    commits = CheckpointCommits(policy, run, async_save=async_save)
    boundary = StepBoundary(StopRequest(run.root), last_step=10, every=2, every_s=0)
    save = _saver(run, policy)
    with pytest.raises(Preempted) as stopped:
        for step in range(1, 11):
            policy.train_step(_batch(step))
            if step == 3:  # the batch script's USR1 trap, while step 3 runs
                (run.root / STOP_FILE).touch()
            at_step_boundary(step, boundary, commits, save)
    assert stopped.value.code == EXIT_REQUEUE and stopped.value.step == 3
    # Exit 75 means saved: step 3 is complete (finalized, manifest and marker) when the watcher sees it.
    assert (run.root / SAVED_FILE).read_text() == "3\n" and not commits.pending
    assert [c.step for c in run.list_checkpoints()] == [2, 3]
    assert (run.checkpoint_dir(3) / COMPLETE_MARKER).is_file()
    assert (run.checkpoint_dir(3) / "policy" / MANIFEST).is_file()
    assert policy.finalize_checkpoints(blocking=True) == []  # nothing left in flight
