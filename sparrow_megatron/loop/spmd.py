"""The loop under torchrun: rank 0 drives, the other trainer ranks follow.

The trainer (`Policy`) is SPMD: every rank of the Megatron job must make the same collective calls with
the same batch. Only rank 0 talks to the rollout fleet, MLflow and the run directory; it broadcasts each
policy call (name and arguments) before making it, and the other ranks replay the calls until rank 0
says stop. With one process nothing is broadcast and the policy is called directly.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

_STOP = None
# Policy calls a follower replays; anything else from the driver is a bug, not a silent no-op.
_REPLAYED = {"score", "train_step", "iter_hf_weights", "save_checkpoint", "load_checkpoint", "export_hf"}


def launch_rank() -> int:
    """This process's rank in the trainer job, known before torch.distributed is initialised."""
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class DrivenPolicy:
    """Rank 0's handle on the policy: each call is announced to the followers, then made here too."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.world = _world()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.world > 1:
            _broadcast((name, args, kwargs))
        return getattr(self.policy, name)(*args, **kwargs)

    def score(self, batch, top_k: int | None = None):
        return self._call("score", batch, top_k)

    def train_step(self, batch) -> dict[str, float]:
        return self._call("train_step", batch)

    def iter_hf_weights(self):
        return self._call("iter_hf_weights")

    def save_checkpoint(self, path, step: int | None = None):
        return self._call("save_checkpoint", path, step=step)

    def load_checkpoint(self, path) -> dict:
        return self._call("load_checkpoint", path)

    def export_hf(self, out_dir):
        return self._call("export_hf", out_dir)

    def stop(self) -> None:
        """Release the followers (also after an error on rank 0, so they do not wait forever)."""
        if self.world > 1:
            _broadcast(_STOP)
            self.world = 1


def follow(policy) -> int:
    """Replay rank 0's policy calls until it stops; returns how many were made."""
    calls = 0
    while (msg := _broadcast(_STOP)) is not _STOP:
        name, args, kwargs = msg
        if name not in _REPLAYED:
            raise RuntimeError(f"rank {dist.get_rank()}: rank 0 asked for unknown policy call {name!r}")
        out = getattr(policy, name)(*args, **kwargs)
        if name == "iter_hf_weights":
            for _ in out:  # the gathers are collective: walk them in step with rank 0's weight sync
                pass
        calls += 1
    return calls
