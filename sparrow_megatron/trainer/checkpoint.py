"""Step-granular checkpoints with torch.distributed.checkpoint (model, optimizer, step, RNG, extra state).

Tensors are keyed by their TP/PP coordinates, so a checkpoint resumes on the same TP x PP layout (DP
replicas are deduplicated by DCP). `manifest.json` is written last, by rank 0, after every rank has
finished: a directory without it is an interrupted save and is refused; file sizes in the manifest
catch truncated files.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sparrow_megatron.errors import UserError

if TYPE_CHECKING:
    from sparrow_megatron.trainer.policy import Policy

MANIFEST = "manifest.json"
FORMAT = "sparrow-megatron-trainer-ckpt/1"


def _coords() -> tuple[int, int, int]:
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        torch.distributed.get_rank(),
    )


def _bytes_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).clone()


def _state(policy: Policy, for_load: bool) -> dict[str, torch.Tensor]:
    tp_rank, pp_rank, rank = _coords()
    prefix = f"tp{tp_rank}.pp{pp_rank}."
    state: dict[str, torch.Tensor] = {}
    for name, p in policy.model.module.named_parameters():
        state[prefix + "model." + name] = p.data
    opt = policy.optimizer
    if not hasattr(opt, "state_tensors"):
        raise UserError("checkpointing the Megatron distributed optimizer (GPU) is not implemented yet")
    opt_state = opt.state_template() if for_load else opt.state_tensors()
    for key, t in opt_state.items():
        state[prefix + "optim." + key] = t
    return state


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


def save_checkpoint(policy: Policy, ckpt_dir: Path, step: int, extra_state: dict) -> Path:
    """Collective. Writes DCP shards, then (rank 0) the manifest. Returns ckpt_dir."""
    import torch.distributed.checkpoint as dcp

    try:
        extra_json = json.dumps(extra_state)
    except TypeError as exc:
        raise UserError(f"save_checkpoint: extra_state must be JSON-serialisable ({exc})") from exc
    rank = torch.distributed.get_rank()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0 and (ckpt_dir / MANIFEST).exists():
        (ckpt_dir / MANIFEST).unlink()  # overwriting: the directory is incomplete until we finish
    torch.distributed.barrier()
    state = _state(policy, for_load=False)
    _, _, rank = _coords()
    state[f"rank{rank}.rng"] = _bytes_tensor(_rng_state())
    dcp.save(state, checkpoint_id=str(ckpt_dir))
    torch.distributed.barrier()
    if rank == 0:
        files = {
            f.name: f.stat().st_size for f in sorted(ckpt_dir.iterdir()) if f.is_file() and f.name != MANIFEST
        }
        from megatron.core import parallel_state

        manifest = {
            "format": FORMAT,
            "step": int(step),
            "trainer_step": int(policy.step),
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "world_size": torch.distributed.get_world_size(),
            "extra_state": json.loads(extra_json),
            "files": files,
        }
        tmp = ckpt_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(ckpt_dir / MANIFEST)
    torch.distributed.barrier()
    return ckpt_dir


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


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under root (incomplete ones are skipped)."""
    best: tuple[int, Path] | None = None
    for m in Path(root).glob(f"*/{MANIFEST}"):
        try:
            step = int(json.loads(m.read_text())["step"])
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
        if best is None or step > best[0]:
            best = (step, m.parent)
    return best[1] if best else None


def load_checkpoint(policy: Policy, ckpt_dir: Path) -> dict:
    """Collective. Restores model, optimizer, step and RNG in place; returns the saved extra_state."""
    import torch.distributed.checkpoint as dcp
    from megatron.core import parallel_state

    manifest = read_manifest(ckpt_dir)
    layout = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if (manifest["tp"], manifest["pp"]) != layout:
        raise UserError(
            f"{ckpt_dir}: saved with tp={manifest['tp']} pp={manifest['pp']}, "
            f"cannot resume with tp={layout[0]} pp={layout[1]}"
        )
    state = _state(policy, for_load=True)
    _, _, rank = _coords()
    rng_key = f"rank{rank}.rng"
    # The RNG blob's size is only known from the checkpoint metadata.
    try:
        meta = dcp.FileSystemReader(str(ckpt_dir)).read_metadata()
        if rng_key in meta.state_dict_metadata:
            state[rng_key] = torch.empty(meta.state_dict_metadata[rng_key].size, dtype=torch.uint8)
        dcp.load(state, checkpoint_id=str(ckpt_dir))
    except UserError:
        raise
    except Exception as exc:  # DCP raises CheckpointException/RuntimeError wrappers for bad files
        raise UserError(f"{ckpt_dir}: cannot load checkpoint ({type(exc).__name__}: {exc})") from exc
    with torch.no_grad():
        for name, p in policy.model.module.named_parameters():
            p.copy_(state[_prefix() + "model." + name])
    opt_prefix = _prefix() + "optim."
    policy.optimizer.load_state_tensors(
        {k[len(opt_prefix) :]: v for k, v in state.items() if k.startswith(opt_prefix)}
    )
    policy.step = int(manifest["trainer_step"])
    if rng_key in state:
        _set_rng_state(pickle.loads(state[rng_key].numpy().tobytes()))
    torch.distributed.barrier()
    return manifest["extra_state"]


def _prefix() -> str:
    tp_rank, pp_rank, _ = _coords()
    return f"tp{tp_rank}.pp{pp_rank}."
