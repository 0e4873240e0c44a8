"""The loop under torchrun: rank 0 drives, the other trainer ranks follow.

The trainer objects (`Policy`, and `SparseDistiller` for DistillSparse) are SPMD: every rank of the
Megatron job must make the same collective calls with the same batch. Only rank 0 talks to the rollout
fleet, MLflow and the run directory; it broadcasts each call (object, method and arguments) before
making it, and the other ranks replay the calls until rank 0 says stop. With one process nothing is
broadcast and the objects are called directly.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

_STOP = None
# Calls a follower replays, per object; anything else from the driver is a bug, not a silent no-op.
_REPLAYED = {
    "policy": {"score", "train_step", "iter_hf_weights", "export_hf"}
    | {"save_checkpoint", "finalize_checkpoints", "load_checkpoint"},
    "distill": {"step", "probe_acceptance", "export", "save", "load"},
}


def launch_rank() -> int:
    """This process's rank in the trainer job, known before torch.distributed is initialised."""
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Driver:
    """Rank 0's side: announces each call to the followers, then makes it here too."""

    def __init__(self) -> None:
        self.world = _world()

    def call(self, target: str, obj: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.world > 1:
            _broadcast((target, name, args, kwargs))
        return getattr(obj, name)(*args, **kwargs)

    def stop(self) -> None:
        """Release the followers (also after an error on rank 0, so they do not wait forever)."""
        if self.world > 1:
            _broadcast(_STOP)
            self.world = 1


class DrivenPolicy:
    """Rank 0's handle on the policy."""

    def __init__(self, policy, driver: Driver | None = None) -> None:
        self.policy = policy
        self.driver = driver or Driver()

    @property
    def world(self) -> int:
        return self.driver.world

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.driver.call("policy", self.policy, name, *args, **kwargs)

    def score(self, batch, top_k: int | None = None):
        return self._call("score", batch, top_k)

    def train_step(self, batch) -> dict[str, float]:
        return self._call("train_step", batch)

    def iter_hf_weights(self, **kwargs):
        return self._call("iter_hf_weights", **kwargs)

    def save_checkpoint(self, path, step: int | None = None):
        return self._call("save_checkpoint", path, step=step)

    def finalize_checkpoints(self, blocking: bool = False) -> list[str]:
        return self._call("finalize_checkpoints", blocking)

    def load_checkpoint(self, path) -> dict:
        return self._call("load_checkpoint", path)

    def export_hf(self, out_dir):
        return self._call("export_hf", out_dir)

    def stop(self) -> None:
        self.driver.stop()


class DrivenDistiller:
    """Rank 0's handle on the DistillSparse adapter trainer (its calls are collective like the policy's)."""

    def __init__(self, distiller, driver: Driver) -> None:
        self.distiller = distiller
        self.driver = driver

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.driver.call("distill", self.distiller, name, *args, **kwargs)

    def step(self, batch, dense_logprobs, schedules) -> dict[str, float]:
        return self._call("step", batch, dense_logprobs, schedules)

    def probe_acceptance(self, probe, schedules, top_k: int = 20) -> dict[str, float]:
        return self._call("probe_acceptance", probe, schedules, top_k)

    def export(self, out_dir):
        return self._call("export", out_dir)

    def save(self, path) -> None:
        return self._call("save", path)

    def load(self, path) -> None:
        return self._call("load", path)


def follow(targets: dict[str, Any]) -> int:
    """Replay rank 0's calls on these objects ("policy", "distill") until it stops; returns the count."""
    calls = 0
    while (msg := _broadcast(_STOP)) is not _STOP:
        target, name, args, kwargs = msg
        if target not in targets or name not in _REPLAYED[target]:
            raise RuntimeError(f"rank {dist.get_rank()}: rank 0 asked for unknown call {target}.{name}")
        out = getattr(targets[target], name)(*args, **kwargs)
        if name == "iter_hf_weights":
            for _ in out:  # the gathers are collective: walk them in step with rank 0's weight sync
                pass
        calls += 1
    return calls
