"""Step-granular checkpoints with Megatron-Core's dist_checkpointing (model, optimizer, step, RNG, extra).

The model's and the optimizer's sharded state dicts carry global shapes and each rank's offsets, so a
checkpoint resumes under another TP x PP (x DP) layout: on CPU the AdamW moments are ShardedTensors
shaped like their parameters, on GPU the distributed optimizer saves its canonical per-parameter layout
("fully_reshardable"). One code path, the optimizer's `sharded_state_dict` is the only difference.
`manifest.json` is written last, by rank 0, after every rank has finished: a directory without it is
an interrupted save and is refused; file sizes in the manifest catch truncated files. With
trainer.async_save the shards are written in the background (trainer/async_save.py) and the manifest
by the finalize step that runs once every rank's write is done. Each rank's RNG state is restored
when the layout is the one saved (RL runs without dropout: a resharded resume keeps the RNG of its
seed).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer import async_save
from sparrow_megatron.trainer.async_save import AsyncSaves


class Checkpointable(Protocol):
    """What a checkpoint holds of the policy (trainer.policy.Policy): its public model, optimizer, step."""

    model: Any  # the DDP-wrapped GPTModel
    optimizer: Any  # CpuAdamW or MegatronOptimizer
    step: int


MANIFEST = "manifest.json"
FORMAT = "sparrow-megatron-trainer-ckpt/2"
RNG_DIR = "rng"


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "world_size": torch.distributed.get_world_size(),
    }


def _sharded_state(policy: Checkpointable, is_loading: bool) -> dict:
    model_sd = policy.model.module.sharded_state_dict()
    return {"model": model_sd, "optimizer": policy.optimizer.sharded_state_dict(model_sd, is_loading)}


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    policy: Checkpointable, ckpt_dir: Path, step: int, extra_state: dict, saves: AsyncSaves | None = None
) -> Path:
    """Collective. Writes the sharded state, each rank's RNG, then (rank 0) the manifest. With `saves`
    (trainer.async_save) the shards are written in the background and the manifest only by
    `saves.finalize`, once every rank's shards are on disk; an earlier save in flight is finalized first."""
    from megatron.core import dist_checkpointing

    try:
        extra_json = json.dumps(extra_state)
    except TypeError as exc:
        raise UserError(f"save_checkpoint: extra_state must be JSON-serialisable ({exc})") from exc
    if saves is not None:
        saves.finalize(blocking=True)  # one save in flight at a time: one host snapshot of the state
    rank = torch.distributed.get_rank()
    if rank == 0:
        if (ckpt_dir / MANIFEST).exists():
            (ckpt_dir / MANIFEST).unlink()  # overwriting: the directory is incomplete until we finish
        if ckpt_dir.exists():  # dist_checkpointing wants an empty directory (else it warns "corrupted")
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
    torch.distributed.barrier()
    kwargs = {"async_sharded_save": True, **async_save.strategy_kwargs()} if saves is not None else {}
    request = dist_checkpointing.save(_sharded_state(policy, is_loading=False), str(ckpt_dir), **kwargs)
    if rank == 0:
        (ckpt_dir / RNG_DIR).mkdir()
    torch.distributed.barrier()
    torch.save(_rng_state(), ckpt_dir / RNG_DIR / f"rank{rank}.pt")  # this step's RNG, also when async
    torch.distributed.barrier()
    manifest = {
        "format": FORMAT,
        "step": int(step),
        "trainer_step": int(policy.step),  # read now: training goes on while an async save writes
        **_layout(),
        "extra_state": json.loads(extra_json),
    }

    def write_manifest() -> None:
        if torch.distributed.get_rank() == 0:
            _write_manifest(ckpt_dir, manifest)
        torch.distributed.barrier()

    if saves is None:
        write_manifest()
    else:
        saves.schedule(request, ckpt_dir, write_manifest)
    return ckpt_dir


def _write_manifest(ckpt_dir: Path, manifest: dict) -> None:
    """The last file of a checkpoint: every other file's size, written atomically."""
    files = {
        str(f.relative_to(ckpt_dir)): f.stat().st_size
        for f in sorted(ckpt_dir.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({**manifest, "files": files}, indent=2))
    tmp.replace(ckpt_dir / MANIFEST)


def read_manifest(ckpt_dir: Path) -> dict:
    """The manifest of a complete checkpoint; UserError for a missing, partial or corrupt one."""
    path = ckpt_dir / MANIFEST
    if not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir}: checkpoint directory does not exist")
    if not path.is_file():
        raise UserError(f"{ckpt_dir}: incomplete checkpoint (no {MANIFEST}; the save was interrupted)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: corrupt manifest ({exc.msg})") from exc
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, size in manifest.get("files", {}).items():
        f = ckpt_dir / name
        if not f.is_file():
            raise UserError(f"{ckpt_dir}: checkpoint file {name} is missing")
        if f.stat().st_size != size:
            raise UserError(f"{f}: size {f.stat().st_size} != {size} recorded in {MANIFEST}; file is corrupt")
    return manifest


def load_checkpoint(policy: Checkpointable, ckpt_dir: Path) -> dict:
    """Collective. Restores model, optimizer, step and RNG in place (any TP x PP); returns extra_state."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    manifest = read_manifest(ckpt_dir)
    try:
        state = dist_checkpointing.load(_sharded_state(policy, is_loading=True), str(ckpt_dir))
        policy.model.module.load_state_dict(state["model"])
        policy.optimizer.load_sharded_state_dict(state["optimizer"])
    except UserError:
        raise
    # Shape mismatches, missing keys, unreadable shards (DCP's CheckpointException is a BaseException).
    except (Exception, CheckpointException) as exc:
        raise UserError(
            f"{ckpt_dir}: cannot load checkpoint into this model ({type(exc).__name__}: {exc})"
        ) from exc
    policy.step = int(manifest["trainer_step"])
    rng = ckpt_dir / RNG_DIR / f"rank{torch.distributed.get_rank()}.pt"
    if all(manifest.get(k) == v for k, v in _layout().items()) and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    torch.distributed.barrier()
    return manifest["extra_state"]
