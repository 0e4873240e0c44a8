"""The loop's weight sync: the policy's weights to every engine after each update, per rollout.weight_sync.

- http: buckets of CPU tensors through /update_weights_from_tensor, one copy per engine;
- distributed: buckets stay on the trainer's device and are broadcast once to a group of all engines
  (NCCL on GPU, gloo on CPU; rendezvous at SPARROW_WEIGHT_SYNC_ADDR on Slurm, else a free local port);
  with pipeline parallelism each stage broadcasts its own weights from the rank that holds them;
- disk: the policy writes one safetensors snapshot under the run directory, every engine reloads it (and
  a restarted engine starts from it).

`catch_up` brings engines that came back (restarted, re-attached) to the current weights before the next
rollout, so the fleet serves on every engine; until then routing keeps them out.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger("sparrow.loop")


class WeightSync:
    def __init__(self, mode: str, fleet, run_root: Path, bucket_mb: int = 512, stages: int = 1):
        self.mode = mode
        self.stages = stages  # the trainer's pipeline stages: one sender each (distributed)
        self.fleet = fleet
        self.bucket_bytes = bucket_mb << 20
        self.snapshots = Path(run_root) / "weight_sync"
        self.last_bytes = 0
        if mode == "distributed":
            self.fleet.init_distributed_sync(_group_spec(), stages=stages)

    def push(self, policy) -> dict[str, float]:
        """New weights to every engine under the next version; returns the sync/* metrics."""
        if self.mode == "http":
            self.fleet.sync_weights(policy.iter_hf_weights(bucket_bytes=self.bucket_bytes))
        elif self.mode == "distributed":
            # A callable: a sync that loses an engine re-gathers the buckets for the engines left.
            self.fleet.sync_weights_distributed(self._stage_buckets(policy))
        elif self.mode == "disk":
            self.fleet.sync_weights_from_disk(self._snapshot(policy, self.fleet.weight_version + 1))
        else:
            raise AssertionError(self.mode)
        self.last_bytes = self.fleet.last_sync_bytes
        metrics = {"sync/bytes": float(self.last_bytes)}
        if self.mode == "distributed" and self.stages > 1:  # each stage's sender sends its own share
            for s, nbytes in enumerate(self.fleet.last_sync_stage_bytes):
                metrics[f"sync/bytes_stage{s}"] = float(nbytes)
        return metrics

    def _stage_buckets(self, policy):
        """The distributed sync's bucket source; a callable: a sync that loses an engine re-gathers the
        buckets for the engines left. Under PP each call carries the stages' senders' instructions."""
        return lambda: policy.iter_hf_weights(
            bucket_bytes=self.bucket_bytes,
            to_host=False,
            stage_relay=self.fleet.distributed_relay() if self.stages > 1 else None,
        )

    def catch_up(self, policy) -> int:
        """Current weights, at the current version, to healthy engines behind it; returns how many."""
        stale = self.fleet.stale_engines()
        if not stale or self.fleet.weight_version == 0:
            return 0  # version 0 is the base model every engine starts from
        ids = [e.engine_id for e in stale]
        log.warning("engines %s are behind weights v%d: catching them up", ids, self.fleet.weight_version)
        if self.mode == "http":
            self.fleet.sync_weights(policy.iter_hf_weights(bucket_bytes=self.bucket_bytes), catch_up=True)
        elif self.mode == "disk":
            self.fleet.sync_weights_from_disk(self._current_snapshot(), catch_up=True)
        else:  # the group is rebuilt with them: one more broadcast of the current weights to all
            self.fleet.sync_weights_distributed(self._stage_buckets(policy), catch_up=True)
        return len(stale)

    def _snapshot(self, policy, version: int) -> Path:
        out = self.snapshots / f"v{version:06d}"
        shutil.rmtree(out, ignore_errors=True)
        policy.export_hf(out)  # collective; rank 0 writes
        for old in self.snapshots.iterdir():  # restarts load the newest: older ones can go
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
        return out

    def _current_snapshot(self) -> Path:
        return self.snapshots / f"v{self.fleet.weight_version:06d}"


def _group_spec():
    from sparrow_megatron.rollout.server import free_port
    from sparrow_megatron.rollout.weights import DistributedGroupSpec

    host, _, port = os.environ.get("SPARROW_WEIGHT_SYNC_ADDR", "").rpartition(":")
    return DistributedGroupSpec(
        master_address=host or "127.0.0.1",
        master_port=int(port) if port else free_port("127.0.0.1"),
        backend="nccl" if torch.cuda.is_available() else "gloo",
    )


def weight_sync(cfg, fleet, run_root: Path) -> WeightSync:
    """The loop's weight sync for this job config."""
    return WeightSync(
        cfg.rollout.weight_sync, fleet, run_root, cfg.rollout.weight_sync_bucket_mb, stages=cfg.trainer.pp
    )
