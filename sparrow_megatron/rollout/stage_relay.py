"""Distributed weight sync under pipeline parallelism: each stage's weights leave from the trainer rank
that holds them (TP rank 0, DP rank 0 of the stage), not through a relay over the pipeline to rank 0.

SGLang's weight-update group broadcasts from its rank 0, so there is one group per stage, the stage's
sender being its rank 0 and the engines' ranks following (each engine joins every stage's group, under
distinct names). Trainer rank 0 owns the fleet and the engines' HTTP control: it decides the groups
(members, names, when to rebuild) and sends each engine one `update_weights_from_distributed` request per
bucket, in one global order (round-robin over the stages), so the engines' receives and the senders'
broadcasts meet whatever the stages' speeds. A remote sender and rank 0 talk through a small TCP store
that rank 0 hosts, one key prefix per attempt:

    {a}/addr/{s}    sender s -> rank 0: host:port of its group's rendezvous (it is rank 0 there)
    {a}/plan        rank 0 -> senders: per stage (group name, world size), or nothing to send
    {a}/meta/{s}/{k} sender s -> rank 0: names/dtypes/shapes of its bucket k ("" after the last one)
    {a}/abort       rank 0 -> senders: an engine failed, stop broadcasting (a broadcast to a lost engine
                    may never complete: a sender polls this flag while it waits, never blocks for good)
    {a}/done/{s}    sender s -> rank 0: bytes broadcast, the error if any, how many meta keys it set
                    (rank 0 deletes the attempt's keys once every sender reported)

Bytes reaching the engines stay one copy per stage: each stage's sender broadcasts only its own buckets.
"""

from __future__ import annotations

import logging
import pickle
import socket
import time
from collections.abc import Iterator
from datetime import timedelta

import torch

from sparrow_megatron.rollout.weights import Bucket, DistributedGroupSpec, flatten_bucket, init_trainer_group

logger = logging.getLogger(__name__)

POLL_S = 0.01


class Aborted(RuntimeError):
    """Rank 0 set the abort flag of this attempt."""


def connect(relay: dict, master: bool = False) -> torch.distributed.TCPStore:
    return torch.distributed.TCPStore(
        relay["host"], relay["port"], is_master=master, wait_for_workers=False,
        timeout=timedelta(seconds=relay["timeout_s"]),
    )  # fmt: skip


def local_address(peer: str) -> str:
    """This host's address as seen from `peer` (the interface a packet to it would leave from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((peer, 9))  # UDP connect sends nothing: it only picks the route
        return sock.getsockname()[0]


# The sender's current group, kept across syncs like rank 0's (rebuilt only when rank 0 names a new one).
_group: dict[str, object] = {"name": None, "handle": None}


def _drop_group() -> None:
    handle, _group["handle"], _group["name"] = _group["handle"], None, None
    if handle is not None:
        try:
            torch.distributed.destroy_process_group(handle)
        except Exception as err:  # a group broken by a dead peer may refuse a clean teardown
            logger.warning("weight-sync stage group: destroy: %s", err)


def _wait(store, abort_key: str, done) -> None:
    """Wait until done() while rank 0 has not aborted the attempt."""
    while not done():
        if store.check([abort_key]):
            raise Aborted("aborted by trainer rank 0")
        time.sleep(POLL_S)


def follow_stage(buckets: Iterator[Bucket], relay: dict, stage: int, is_sender: bool) -> Iterator[Bucket]:
    """A trainer rank other than 0, in one sync attempt: the stage's sender broadcasts its own buckets
    to the engines in its stage group; every other rank walks the iterator (its TP gathers are
    collective with the sender). Yields nothing: the caller drains it."""
    if not is_sender:
        for _ in buckets:
            pass
        return
    yield from ()
    store = connect(relay)
    a = relay["attempt"]
    abort = f"{a}/abort"
    host = local_address(relay["host"])
    from sparrow_megatron.rollout.server import free_port

    port = free_port(host)
    store.set(f"{a}/addr/{stage}", f"{host}:{port}")
    plan = pickle.loads(store.get(f"{a}/plan"))
    sent, result, metas = 0, "", 0
    try:
        if plan is None:
            raise Aborted("rank 0 sends nothing this attempt")
        name, world = plan[stage]
        if _group["name"] != name:
            _drop_group()
            spec = DistributedGroupSpec(host, port, group_name=name, backend=relay["backend"])
            timeout = timedelta(seconds=relay["timeout_s"])
            # In a thread: an engine that never joins must not keep this rank past rank 0's abort.
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=1)
            join = pool.submit(init_trainer_group, spec, world, timeout)
            pool.shutdown(wait=False)
            _wait(store, abort, join.done)
            _group.update(name=name, handle=join.result())
        pending = None
        k = 0
        for bucket in buckets:
            flat, meta = flatten_bucket(bucket)
            store.set(f"{a}/meta/{stage}/{k}", pickle.dumps(meta))  # rank 0 queues the engines' receive
            metas = k + 1
            if pending is not None:
                _wait(store, abort, pending[0].is_completed)  # bucket k gathered while k-1 was in flight
                pending[0].wait()  # raises if the broadcast failed
            pending = (torch.distributed.broadcast(flat, src=0, group=_group["handle"], async_op=True), flat)
            sent += flat.numel()
            k += 1
        if pending is not None:
            _wait(store, abort, pending[0].is_completed)
            pending[0].wait()
        store.set(f"{a}/meta/{stage}/{k}", b"")
        metas = k + 1
    except Exception as err:
        result = f"stage {stage}: {type(err).__name__}: {err}"
        for _ in buckets:  # the TP peers still gather: walk to the end
            pass
    store.set(f"{a}/done/{stage}", pickle.dumps((sent, result, metas)))
    if result and plan is not None:
        # Rank 0 rebuilds every group after a failed attempt. Left only after the report: a broadcast
        # still pending (to a live engine rank 0 stopped feeding) holds the teardown until the engines
        # leave the group, which rank 0 asks them once every sender has reported.
        _drop_group()
