"""Rank 0's side of the distributed weight sync under pipeline parallelism (PP > 1).

One weight-update group per stage, the stage's sender as its rank 0 (SGLang receives from rank 0 of a
group); rank 0 is stage 0's sender and drives everything else: the groups, the engines' joins and one
`update_weights_from_distributed` request per bucket of every stage. The protocol with the other stages'
senders (a TCP store rank 0 hosts) is described in rollout/stage_relay.py, which holds their side.

Each engine gets its requests from one thread, in one global order (round-robin over the stages: bucket
k of stage 0, of stage 1, ..., then bucket k+1), the same for every engine, so no two engines wait on
each other's broadcasts in opposite orders. A failed attempt is decided here and announced to the
senders (abort flag); it ends only when every sender reported, so all trainer ranks leave the attempt
together; then the engines that failed are dropped, every group is rebuilt and the fleet retries.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from datetime import timedelta

import torch

from sparrow_megatron.rollout.dist_sync import DistributedSync, SyncFailed, _Group
from sparrow_megatron.rollout.engine import Engine, EngineFailure
from sparrow_megatron.rollout.stage_relay import POLL_S, connect
from sparrow_megatron.rollout.weights import Bucket, flatten_bucket, init_trainer_group

logger = logging.getLogger(__name__)


class StagedSync(DistributedSync):
    """DistributedSync with one sender per pipeline stage (stages > 1)."""

    def __init__(self, fleet, spec, stages: int, timeout_s: float = 600.0):
        super().__init__(fleet, spec, timeout_s)
        self.stages = stages
        self.store = None
        self._relay: dict | None = None
        self._attempts = 0

    def relay(self) -> dict:
        """The arguments the trainer ranks need for the next attempt (passed with the weights call)."""
        if self.store is None:
            from sparrow_megatron.rollout.server import free_port

            port = free_port(self.spec.master_address)
            info = {"host": self.spec.master_address, "port": port, "timeout_s": self.timeout_s}
            self.store = connect(info, master=True)
        self._attempts += 1
        self._relay = {
            "host": self.spec.master_address, "port": self.store.port, "timeout_s": self.timeout_s,
            "backend": self.spec.backend, "attempt": f"{self.session}.{self._attempts}",
        }  # fmt: skip
        return dict(self._relay)

    # ------------------------------------------------------------------ store helpers

    def _key(self, *parts) -> str:
        return "/".join([self._relay["attempt"], *map(str, parts)])

    def _await(self, key: str, stage: int, watch: list[dict[int, Future]], failed: dict) -> bytes | None:
        """The value of key once the sender of `stage` set it; None if it reported instead (it failed),
        an engine request failed meanwhile (in `failed`), or the timeout passed."""
        done = self._key("done", stage)
        deadline = time.monotonic() + self.timeout_s
        while not self.store.check([key]):
            if self.store.check([done]):
                if self.store.check([key]):  # set just before the report (the last bucket's end mark)
                    break
                error = pickle.loads(self.store.get(done))[1] or "reported before setting it"
                failed.setdefault(-1 - stage, RuntimeError(f"stage {stage}'s sender: {key}: {error}"))
                return None
            for futs in watch:
                for eid, f in futs.items():
                    if f.done() and isinstance(f.exception(), EngineFailure):
                        failed[eid] = f.exception()
            if failed:
                return None
            if time.monotonic() > deadline:
                failed.setdefault(-1 - stage, TimeoutError(f"stage {stage}'s sender did not set {key}"))
                return None
            time.sleep(POLL_S)
        return self.store.get(key)

    def _reports(self, failed: dict) -> list[int]:
        """Wait for every remote sender's report, then delete the attempt's keys (the store lives as
        long as the run); returns the bytes each stage broadcast."""
        sent = []
        keys = [self._key("plan"), self._key("abort")]
        for s in range(1, self.stages):
            key = self._key("done", s)
            try:
                self.store.wait([key], timedelta(seconds=self.timeout_s))
                nbytes, error, metas = pickle.loads(self.store.get(key))
            except Exception as err:  # a sender that never reports: its trainer rank is gone
                nbytes, error, metas = 0, f"stage {s}: no report: {err}", 0
            if error and not failed:
                failed[-1 - s] = RuntimeError(error)
            sent.append(nbytes)
            keys += [key, self._key("addr", s), *(self._key("meta", s, k) for k in range(metas))]
        for key in keys:
            self.store.delete_key(key)  # False when it was never set
        return sent

    # ------------------------------------------------------------------ groups

    def _ensure_groups(self, addrs: dict[int, tuple[str, int]]) -> _Group:
        """The current groups, rebuilt if the healthy engines changed; writes the attempt's plan."""
        plan_key = self._key("plan")
        members = self._members()
        if self.group is None or self.group.members != members:
            for engine in self.fleet.engines:
                if engine.healthy:
                    self.fleet._probe(engine, "weight-sync group")
            members = self._members()
        if self.group is not None and self.group.members == members:
            self.store.set(plan_key, pickle.dumps(self._plan(self.group)))
            return self.group
        self.destroy()
        if not members:
            raise EngineFailure("distributed weight sync: no healthy engine to build a group with")
        self.builds += 1
        names = tuple(f"{self.spec.group_name}_{self.session}_{self.builds}_s{s}" for s in range(self.stages))
        from sparrow_megatron.rollout.server import free_port

        port = free_port(self.spec.master_address, self.spec.master_port + self.builds - 1)
        tp = self.fleet.rollout.engine_tp
        world = 1 + tp * len(members)
        pending = _Group(None, names[0], members, names)
        self.store.set(plan_key, pickle.dumps(self._plan(pending, world)))  # the senders join now
        where = {0: (self.spec.master_address, port), **addrs}
        engines = {e.engine_id: e for e in self.fleet.engines}

        def join_all(engine: Engine, offset: int) -> None:
            # Every engine joins the stage groups in the same order: each join returns only once the
            # whole group met, so two engines joining in opposite orders would wait on each other.
            for s, name in enumerate(names):
                engine.control("init_weights_update_group", {
                    "master_address": where[s][0], "master_port": where[s][1], "rank_offset": offset,
                    "world_size": world, "group_name": name, "backend": self.spec.backend})  # fmt: skip

        pool = ThreadPoolExecutor(max_workers=len(members) + 1)
        futs = {eid: pool.submit(join_all, engines[eid], 1 + k * tp) for k, (eid, _) in enumerate(members)}
        spec = replace(self.spec, master_port=port, group_name=names[0])
        join = pool.submit(init_trainer_group, spec, world, timedelta(seconds=self.timeout_s))
        pool.shutdown(wait=False)
        failed: dict[int, BaseException] = {}
        waiting = {join, *futs.values()}
        while waiting and not failed:
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            failed = {eid: f.exception() for eid, f in futs.items() if f in done and f.exception()}
        if not failed and join.exception() is not None:
            failed = {-1: join.exception()}
        if failed:
            self.store.set(self._key("abort"), b"1")  # the senders stop waiting for their rendezvous
            if join.done() and join.exception() is None:
                torch.distributed.destroy_process_group(join.result())
            for eid, err in failed.items():
                if eid >= 0:
                    self.fleet._mark_dead(engines[eid], f"init_weights_update_group: {err}")
            raise SyncFailed(f"engines {sorted(failed)} failed to join the weight-sync groups")
        self.group = replace(pending, handle=join.result())
        logger.info("weight-sync groups %s: engines %s (world %d)", names, [m[0] for m in members], world)
        return self.group

    def destroy(self) -> None:
        """Leave the current groups: the engines first, so that a broadcast of ours still pending (to a
        live engine that will not receive it) fails at once instead of holding our teardown."""
        group = self.group
        if group is None:
            return
        self.group = replace(group, handle=None)
        handle = group.handle
        super().destroy()  # the engines leave every stage group (our handle is None here)
        try:
            torch.distributed.destroy_process_group(handle)
        except Exception as err:  # a group broken by a dead peer may refuse a clean teardown
            logger.warning("weight-sync group %s: destroy: %s", group.name, err)

    def _plan(self, group: _Group, world: int | None = None) -> dict[int, tuple[str, int]]:
        world = world or 1 + self.fleet.rollout.engine_tp * len(group.members)
        return {s: (group.names[s], world) for s in range(1, self.stages)}

    # ------------------------------------------------------------------ the sync

    def broadcast(self, buckets: Iterable[Bucket]) -> list[Engine]:
        """Stage 0's buckets from here, every other stage's from its sender; returns the engines updated.
        Raises SyncFailed (engines marked dead, every trainer rank out of the attempt) on a failure."""
        if self._relay is None:
            raise RuntimeError("StagedSync.broadcast: the weights call must carry relay() (one per attempt)")
        it = iter(buckets)
        failed: dict[int, BaseException] = {}
        members: list[Engine] = []
        sent0 = 0
        try:
            addrs = {}
            for s in range(1, self.stages):
                raw = self._await(self._key("addr", s), s, [], failed)
                if raw is None:
                    raise SyncFailed(f"stage {s}'s sender did not answer: {failed}")
                host, _, port = raw.decode().rpartition(":")
                addrs[s] = (host, int(port))
            group = self._ensure_groups(addrs)
        except EngineFailure as err:
            if not self.store.check([self._key("plan")]):
                self.store.set(self._key("plan"), pickle.dumps(None))
            self.store.set(self._key("abort"), b"1")
            for _ in it:
                pass
            self._reports({})
            self._relay = None
            if isinstance(err, SyncFailed):
                raise
            raise SyncFailed(str(err)) from err
        engines = {e.engine_id: e for e in self.fleet.engines}
        members = [engines[eid] for eid, _ in group.members]
        pools = {e.engine_id: ThreadPoolExecutor(max_workers=1) for e in members}
        remote: list[dict[int, Future]] = []
        try:
            self._all(members, pools, failed, lambda e: e.control("begin_weight_update", {}))

            def request(meta: dict, stage: int) -> dict[int, Future]:
                # No weight_version per bucket: the fleet stamps it once every bucket is in.
                payload = {**meta, "group_name": group.names[stage], "load_format": "flattened_bucket",
                           "flush_cache": True}  # fmt: skip
                return {e.engine_id: pools[e.engine_id].submit(e.control, "update_weights_from_distributed",
                        payload, self.timeout_s) for e in members}  # fmt: skip

            pending = None
            active = list(range(self.stages))
            k = 0
            while active and not failed:
                for s in list(active):
                    if s == 0:
                        bucket = next(it, None)
                        if bucket is None:
                            active.remove(0)
                            continue
                        flat, meta = flatten_bucket(bucket)
                        if pending is not None:
                            self._finish(pending, failed)  # bucket k gathered while k-1 was in flight
                            if failed:
                                break
                        futs = request(meta, 0)
                        handle = torch.distributed.broadcast(flat, src=0, group=group.handle, async_op=True)
                        pending = (handle, flat, futs)
                        sent0 += flat.numel()
                    else:
                        raw = self._await(self._key("meta", s, k), s, remote, failed)
                        if raw is None:
                            break
                        if raw == b"":
                            active.remove(s)
                            continue
                        remote.append(request(pickle.loads(raw), s))
                k += 1
            if pending is not None and not failed:
                self._finish(pending, failed)
            for futs in remote:
                for eid, f in futs.items():
                    if not failed:
                        try:
                            f.result()
                        except EngineFailure as err:
                            failed[eid] = err
        except Exception as err:  # a broken collective: every engine of the group is suspect
            logger.error("weight-sync broadcast failed: %s", err)
            failed.setdefault(-1, err)
        if failed:
            self.store.set(self._key("abort"), b"1")
        for _ in it:  # collective with stage 0's other ranks: walk it to its end
            pass
        stage_bytes = [sent0, *self._reports(failed)]  # every sender is out of the attempt now
        if not failed:
            self._all(members, pools, failed, lambda e: e.control("end_weight_update", {}))
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._relay = None
        if failed:
            self._give_up(members, failed, "trainer")
        if sum(stage_bytes) == 0:
            raise ValueError("distributed weight sync: the bucket iterators were empty")
        self.last_stage_bytes = stage_bytes
        self.last_bytes = sum(stage_bytes)
        return members
