"""Weight sync over a process group: the trainer (rank 0) broadcasts each bucket to every engine.

Each bucket travels as one flat byte tensor (SGLang's `flattened_bucket` load format: one broadcast per
bucket, whatever its tensor count) on the device it was gathered on, so on GPU nothing goes through host
memory and NCCL gets the CUDA tensors it needs; on CPU the same code runs over gloo. The broadcast of
bucket k is asynchronous: the bucket iterator (the trainer's TP gather of bucket k+1) runs while it is
in flight, and only then is bucket k waited for.

The group is rebuilt whenever the set of healthy engines differs from the one it was built with (an
engine restarted, died or came back), and after a sync that failed: the engines that failed are marked
dead and dropped, the survivors get a new group, and the sync runs again from the first bucket.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from sparrow_megatron.rollout.engine import Engine, EngineFailure
from sparrow_megatron.rollout.weights import Bucket, DistributedGroupSpec, flatten_bucket

logger = logging.getLogger(__name__)


@dataclass
class _Group:
    handle: Any  # the trainer's ProcessGroup (rank 0)
    name: str
    members: tuple[tuple[int, str], ...]  # (engine_id, url) of the engines that joined
    names: tuple[str, ...] = ()  # every group the engines joined in this build (one per PP stage)


class SyncFailed(EngineFailure):
    """A distributed sync that lost engines: they are marked dead, the group is rebuilt on the next try."""


class DistributedSync:
    """The trainer side of the broadcast group: (re)build it, broadcast buckets, count bytes."""

    def __init__(self, fleet, spec: DistributedGroupSpec, timeout_s: float = 600.0):
        """fleet: the RolloutFleet whose engines form the group (not imported: it imports this module)."""
        self.fleet = fleet
        self.spec = spec
        self.timeout_s = timeout_s
        self.group: _Group | None = None
        self.builds = 0  # how many groups were built (1 + rebuilds)
        # Attached engines outlive a trainer process (a killed and resumed run, the next job on the same
        # fleet) and keep every group they joined by name: a per-process token keeps names unique.
        self.session = uuid.uuid4().hex[:8]
        self.last_bytes = 0  # bytes broadcast by the last successful sync (once: a broadcast, not per engine)
        self.last_stage_bytes: list[int] = []  # the same per pipeline stage (StagedSync; one sender each)

    def _members(self) -> tuple[tuple[int, str], ...]:
        return tuple((e.engine_id, e.url) for e in self.fleet.engines if e.healthy)

    def ensure_group(self) -> _Group:
        """The current group, rebuilt if the healthy engines changed since it was built."""
        members = self._members()
        if self.group is not None and self.group.members == members:
            return self.group
        # A rendezvous with a dead engine would wait out the whole timeout: probe them first.
        for engine in self.fleet.engines:
            if engine.healthy:
                self.fleet._probe(engine, "weight-sync group")
        members = self._members()
        self.destroy()
        if not members:
            raise EngineFailure("distributed weight sync: no healthy engine to build a group with")
        self.builds += 1
        # A fresh name and port per build: the engines keep groups by name, and the previous
        # rendezvous store may still hold its port for a while.
        name = f"{self.spec.group_name}_{self.session}_{self.builds}"
        from sparrow_megatron.rollout.server import free_port

        port = free_port(self.spec.master_address, self.spec.master_port + self.builds - 1)
        spec = replace(self.spec, master_port=port, group_name=name)
        engines = {e.engine_id: e for e in self.fleet.engines}
        tp = self.fleet.rollout.engine_tp
        world = 1 + tp * len(members)
        from sparrow_megatron.rollout.weights import init_trainer_group

        # Not a `with` block: an engine that refuses to join must not leave the trainer waiting out the
        # whole rendezvous timeout (its join thread ends on that timeout, alone).
        pool = ThreadPoolExecutor(max_workers=len(members) + 1)
        # The engines' joins return once the trainer joins too: issue them first, then join.
        futs = {eid: pool.submit(engines[eid].control, "init_weights_update_group", {
            "master_address": spec.master_address, "master_port": port, "rank_offset": 1 + k * tp,
            "world_size": world, "group_name": name, "backend": spec.backend})
            for k, (eid, _) in enumerate(members)}  # fmt: skip
        join = pool.submit(init_trainer_group, spec, world, timedelta(seconds=self.timeout_s))
        pool.shutdown(wait=False)
        failed: dict[int, BaseException] = {}
        pending = {join, *futs.values()}
        while pending and not failed:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            failed = {eid: f.exception() for eid, f in futs.items() if f in done and f.exception()}
        if failed and not join.done():
            for eid, err in failed.items():
                self.fleet._mark_dead(engines[eid], f"init_weights_update_group: {err}")
            raise SyncFailed(f"engines {sorted(failed)} refused to join the weight-sync group")
        handle = join.result()
        failed = {eid: f.exception() for eid, f in futs.items() if f.exception()}
        if failed:
            torch.distributed.destroy_process_group(handle)
            for eid, err in failed.items():
                self.fleet._mark_dead(engines[eid], f"init_weights_update_group: {err}")
            raise SyncFailed(f"engines {sorted(failed)} failed to join the weight-sync group")
        self.group = _Group(handle, name, members)
        logger.info("weight-sync group %s: engines %s (world %d)", name, [m[0] for m in members], world)
        return self.group

    def destroy(self) -> None:
        """Leave the current group (trainer and the engines of it that are still healthy)."""
        group, self.group = self.group, None
        if group is None:
            return
        try:
            if group.handle is not None:  # None would name the default group
                torch.distributed.destroy_process_group(group.handle)
        except Exception as err:  # a group broken by a dead peer may refuse a clean teardown
            logger.warning("weight-sync group %s: destroy: %s", group.name, err)
        alive = {e.engine_id: e for e in self.fleet.engines if e.healthy}
        for eid, _ in group.members:
            for name in group.names or (group.name,):
                if eid in alive:
                    try:
                        alive[eid].control("destroy_weights_update_group", {"group_name": name})
                    except EngineFailure as err:
                        logger.warning("engine %d: destroy_weights_update_group: %s", eid, err)

    def broadcast(self, buckets: Iterable[Bucket]) -> list[Engine]:
        """Send every bucket to the group's engines inside begin/end_weight_update. Returns the engines
        updated. Raises SyncFailed (engines marked dead, iterator drained) if any engine failed."""
        it = iter(buckets)
        try:
            group = self.ensure_group()
        except EngineFailure:
            for _ in it:  # collective on the trainer ranks (their replay walks it): walk it here too
                pass
            raise
        engines = {e.engine_id: e for e in self.fleet.engines}
        members = [engines[eid] for eid, _ in group.members]
        # One thread per engine: its requests must reach it in bucket order (each names the next
        # broadcast's layout), so they are never in flight together.
        pools = {e.engine_id: ThreadPoolExecutor(max_workers=1) for e in members}
        failed: dict[int, BaseException] = {}
        sent = 0
        try:
            self._all(members, pools, failed, lambda e: e.control("begin_weight_update", {}))
            pending = None
            for bucket in it:
                flat, meta = flatten_bucket(bucket)
                if pending is not None:
                    self._finish(pending, failed)  # bucket k+1 was gathered while bucket k was in flight
                    if failed:
                        break
                # No weight_version per bucket: the fleet stamps it once every bucket is in.
                payload = {**meta, "group_name": group.name, "load_format": "flattened_bucket",
                           "flush_cache": True}  # fmt: skip
                futs = {e.engine_id: pools[e.engine_id].submit(e.control, "update_weights_from_distributed",
                        payload, self.timeout_s) for e in members}  # fmt: skip
                handle = torch.distributed.broadcast(flat, src=0, group=group.handle, async_op=True)
                pending = (handle, flat, futs)
                sent += flat.numel()
            if pending is not None and not failed:
                self._finish(pending, failed)
            if not failed:
                self._all(members, pools, failed, lambda e: e.control("end_weight_update", {}))
        except Exception as err:  # a broken collective: every engine of the group is suspect
            logger.error("weight-sync broadcast failed: %s", err)
            failed.setdefault(-1, err)
        finally:
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
        if failed:
            for _ in it:  # the iterator is collective on the trainer ranks: walk it to its end
                pass
            self._give_up(members, failed, "collective")
        if sent == 0:
            raise ValueError("distributed weight sync: the bucket iterator was empty")
        self.last_bytes = sent
        return members

    def _give_up(self, members: list[Engine], failed: dict[int, BaseException], trainer_side: str):
        """A failed sync: the failed engines are marked dead, the survivors' update session closed (so the
        retry can open one), the group left; raises SyncFailed. failed[-1] is the trainer side's error."""
        engines = {e.engine_id: e for e in self.fleet.engines}
        for eid, err in failed.items():
            if eid >= 0:
                self.fleet._mark_dead(engines[eid], f"distributed weight sync: {err}")
        for e in members:
            if e.engine_id not in failed and e.healthy:
                try:
                    e.control("end_weight_update", {})
                except EngineFailure as err:
                    logger.warning("engine %d: end_weight_update after a failed sync: %s", e.engine_id, err)
        self.destroy()
        raise SyncFailed("distributed weight sync failed: " + "; ".join(
            f"engine {i}: {e}" if i >= 0 else f"{trainer_side}: {e}" for i, e in failed.items()))  # fmt: skip

    def _finish(self, pending, failed: dict[int, BaseException]) -> None:
        handle, _flat, futs = pending  # _flat stays referenced until the broadcast completed
        for eid, f in futs.items():
            try:
                f.result()
            except EngineFailure as err:
                failed[eid] = err
        if failed:
            return  # the broadcast may never complete without them: do not wait for it
        handle.wait()

    @staticmethod
    def _all(members: list[Engine], pools, failed: dict[int, BaseException], fn: Callable) -> None:
        futs = {e.engine_id: pools[e.engine_id].submit(fn, e) for e in members}
        for eid, f in futs.items():
            try:
                f.result()
            except EngineFailure as err:
                failed[eid] = err
