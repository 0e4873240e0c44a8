"""Weight sync payloads and the NCCL (distributed) sender side.

Over HTTP, SGLang's default tensor serializer (ForkingPickler: shared-memory handles) kills the server
(it cannot open another process's shared memory); a plain pickle of the named CPU tensors, base64-encoded, is what its SafeUnpickler accepts
and what JSON can carry. The HTTP path copies every byte, so it is the CPU/test path; GPU fleets use
`update_weights_from_distributed` (an NCCL broadcast from the trainer: rollout/dist_sync.py) or a
safetensors snapshot the engines reload (`disk`).
"""

from __future__ import annotations

import base64
import io
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

Bucket = list[tuple[str, torch.Tensor]]


def encode_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """base64 of a plain pickle of [(name, cpu tensor)], the HTTP-safe form of a weight bucket."""
    plain = [(name, tensor.detach().to("cpu").contiguous().clone()) for name, tensor in named_tensors]
    buf = io.BytesIO()
    pickle.dump(plain, buf, protocol=pickle.HIGHEST_PROTOCOL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def tensor_update_payload(
    bucket: Bucket, tp_size: int, weight_version: int | None, single_copy: bool = True
) -> dict:
    encoded = encode_named_tensors(bucket)
    payload: dict = {
        # One copy per engine, not one per TP rank: the engines' plugin (sglang_patches/plugin.py)
        # lets every TP rank read the single entry. tp_size is kept for engines without the plugin.
        "serialized_named_tensors": [encoded] if single_copy else [encoded] * tp_size,
        "flush_cache": True,
    }
    if weight_version is not None:
        payload["weight_version"] = str(weight_version)
    return payload


def rebucket(named_tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[Bucket]:
    """Regroup a stream of (name, tensor) into buckets of at most max_bytes (one tensor may exceed it)."""
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def flatten_bucket(bucket: Bucket) -> tuple[torch.Tensor, dict[str, list]]:
    """One uint8 tensor holding the bucket's tensors back to back (on their device), and the
    names/dtypes/shapes the engine needs to cut it again (SGLang's FlattenedTensorBucket layout)."""
    # Widest dtypes first: SGLang's receiver requires each tensor's byte offset to be a multiple of its
    # element size, which holds when every tensor before it has an element size at least as large.
    bucket = sorted(bucket, key=lambda nt: -nt[1].element_size())
    device = bucket[0][1].device
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket]
    if any(p.device != device for p in parts):
        raise ValueError("flatten_bucket: a bucket's tensors must share one device")
    meta = {
        "names": [n for n, _ in bucket],
        "dtypes": [dtype_name(t.dtype) for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
    }
    return torch.cat(parts), meta


@dataclass
class DistributedGroupSpec:
    """The trainer-side rendezvous of `init_weights_update_group`: rank 0 is the trainer."""

    master_address: str
    master_port: int
    group_name: str = "sparrow_weight_sync"
    backend: str = "nccl"


def init_trainer_group(spec: DistributedGroupSpec, world_size: int, timeout=None):
    """Join the weight-update group as rank 0 (the engines join as ranks 1..; SGLang's own helper
    builds a group outside the default one so the trainer's Megatron groups are untouched).
    timeout (a timedelta) bounds the rendezvous and each collective: a dead engine fails the sync
    instead of hanging it."""
    from sglang.srt.utils.common import init_custom_process_group

    return init_custom_process_group(
        backend=spec.backend,
        init_method=f"tcp://{spec.master_address}:{spec.master_port}",
        timeout=timeout,
        world_size=world_size,
        rank=0,
        group_name=spec.group_name,
    )
