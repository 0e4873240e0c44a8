"""HF Qwen3 safetensors <-> Megatron-Core GPTModel parameters, for any TP x PP split.

One table (`_rule_for`) says, for every Megatron parameter name, which HF tensor(s) it comes from and how
it is split across tensor-parallel ranks. Import slices HF tensors into the local shard; export
all-gathers the TP shards, undoes the layout and broadcasts each pipeline stage's tensors so that every
rank yields the whole model under HF names, in buckets (the weight-sync interface of the rollout side).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.rollout.weights import rebucket
from sparrow_megatron.trainer.model import Qwen3Arch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class _Rule:
    kind: str  # "replicated" | "row" (split dim 0) | "col" (split dim 1) | "qkv" | "fc1"
    hf_names: tuple[str, ...]


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _rule_for(name: str, arch: Qwen3Arch, global_layer: int | None) -> _Rule | None:
    """The HF source of one Megatron parameter (local name, global layer id); None if it has none."""
    if name == "embedding.word_embeddings.weight":
        return _Rule("row", ("model.embed_tokens.weight",))
    if name == "output_layer.weight":
        # With tied embeddings the last stage under PP>1 holds a copy of the embedding.
        source = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return _Rule("row", (source,))
    if name == "decoder.final_layernorm.weight":
        return _Rule("replicated", ("model.norm.weight",))
    m = _LAYER.match(name)
    if m is None:
        return None
    p = f"model.layers.{global_layer}."
    rest = m.group(2)
    table = {
        "input_layernorm.weight": _Rule("replicated", (p + "input_layernorm.weight",)),
        "self_attention.linear_qkv.layer_norm_weight": _Rule("replicated", (p + "input_layernorm.weight",)),
        "self_attention.linear_qkv.weight": _Rule(
            "qkv", tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv")
        ),
        "self_attention.linear_qkv.bias": _Rule("qkv", tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv")),
        "self_attention.q_layernorm.weight": _Rule("replicated", (p + "self_attn.q_norm.weight",)),
        "self_attention.k_layernorm.weight": _Rule("replicated", (p + "self_attn.k_norm.weight",)),
        "self_attention.linear_proj.weight": _Rule("col", (p + "self_attn.o_proj.weight",)),
        "pre_mlp_layernorm.weight": _Rule("replicated", (p + "post_attention_layernorm.weight",)),
        "mlp.linear_fc1.layer_norm_weight": _Rule("replicated", (p + "post_attention_layernorm.weight",)),
        "mlp.linear_fc1.weight": _Rule("fc1", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
        "mlp.linear_fc2.weight": _Rule("col", (p + "mlp.down_proj.weight",)),
    }
    return table.get(rest)


def _global_layer_ids(model) -> dict[int, int]:
    """Local layer index -> global layer id (Megatron's layer_number is 1-based and global under PP)."""
    decoder = getattr(_unwrap(model), "decoder", None)
    if decoder is None:
        return {}
    return {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _named_rules(model, arch: Qwen3Arch) -> Iterator[tuple[str, torch.nn.Parameter, _Rule]]:
    layer_ids = _global_layer_ids(model)
    for raw_name, param in _unwrap(model).named_parameters():
        name = _strip(raw_name)
        m = _LAYER.match(name)
        rule = _rule_for(name, arch, layer_ids[int(m.group(1))] if m else None)
        if rule is None:
            raise UserError(f"Megatron parameter {name!r} has no HF mapping (unsupported layer spec?)")
        yield name, param, rule


# ---------------------------------------------------------------- HF checkpoint reading


class HFCheckpoint:
    """Lazy reader of a local HF safetensors checkpoint, single file or sharded with an index."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"{index}: not a valid safetensors index ({exc})") from exc
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise UserError(f"{index}: shard file(s) missing from {self.dir}: {', '.join(missing)}")
            self.weight_map = dict(weight_map)
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise UserError(f"{self.dir}: no *.safetensors weights (and no model.safetensors.index.json)")
            self.weight_map = {}
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                        self.weight_map[key] = f.name
        self._handles: dict[str, object] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise UserError(f"{self.dir}: tensor {name!r} not found in the HF checkpoint")
        fname = self.weight_map[name]
        if fname not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[fname] = safe_open(str(self.dir / fname), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise UserError(f"{self.dir / fname}: cannot read safetensors file ({exc})") from exc
        return self._handles[fname].get_tensor(name)


# ---------------------------------------------------------------- layout transforms


def _qkv_full(arch: Qwen3Arch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v -> Megatron linear_qkv: per query group [its q heads, k, v] (works for weight and bias)."""
    g, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // g
    tail = q.shape[1:]
    full = torch.cat([q.reshape(g, per * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1)
    return full.reshape(g * (per + 2) * d, *tail)


def _qkv_split(arch: Qwen3Arch, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // g
    tail = full.shape[1:]
    grouped = full.reshape(g, (per + 2) * d, *tail)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return (
        q.reshape(g * per * d, *tail).contiguous(),
        k.reshape(g * d, *tail).contiguous(),
        v.reshape(g * d, *tail).contiguous(),
    )


def _shard_from_hf(rule: _Rule, arch: Qwen3Arch, tensors: list[torch.Tensor], tp: int, rank: int):
    if rule.kind == "replicated":
        return tensors[0]
    if rule.kind == "row":
        return tensors[0].chunk(tp, dim=0)[rank]
    if rule.kind == "col":
        return tensors[0].chunk(tp, dim=1)[rank]
    if rule.kind == "qkv":
        # Query groups are contiguous in the Megatron layout, so a TP shard is a contiguous row block.
        return _qkv_full(arch, *tensors).chunk(tp, dim=0)[rank]
    if rule.kind == "fc1":
        gate, up = tensors
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    raise AssertionError(rule.kind)


def _hf_from_full(rule: _Rule, arch: Qwen3Arch, gathered: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Inverse of _shard_from_hf given the TP shards concatenated along their split dim."""
    if rule.kind in ("replicated", "row", "col"):
        return [gathered]
    if rule.kind == "qkv":
        return list(_qkv_split(arch, gathered))
    if rule.kind == "fc1":
        per_rank = gathered.reshape(tp, 2, -1, *gathered.shape[1:])
        f = per_rank.shape[2] * tp
        gate = per_rank[:, 0].reshape(f, *gathered.shape[1:]).contiguous()
        up = per_rank[:, 1].reshape(f, *gathered.shape[1:]).contiguous()
        return [gate, up]
    raise AssertionError(rule.kind)


# ---------------------------------------------------------------- import


@torch.no_grad()
def load_hf_weights(model, arch: Qwen3Arch, model_dir: str | Path) -> None:
    """Copy the local TP/PP shard of every Megatron parameter from an HF checkpoint (exact copy)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    ckpt = HFCheckpoint(model_dir)
    for name, param, rule in _named_rules(model, arch):
        tensors = [ckpt.get(n) for n in rule.hf_names]
        shard = _shard_from_hf(rule, arch, tensors, tp, rank)
        if tuple(shard.shape) != tuple(param.shape):
            raise UserError(
                f"{ckpt.dir}: {', '.join(rule.hf_names)} gives shape {tuple(shard.shape)} for Megatron "
                f"{name!r} (tp rank {rank}/{tp}), expected {tuple(param.shape)} "
                "(config.json and weights disagree)"
            )
        param.copy_(shard.to(param.dtype))


# ---------------------------------------------------------------- export


def _tp_gather(tensor: torch.Tensor, rule: _Rule) -> torch.Tensor:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or rule.kind == "replicated":
        return tensor
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=1 if rule.kind == "col" else 0)


def _local_hf_tensors(model, arch: Qwen3Arch, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's weights (or their main_grad) under HF names, TP-gathered (collective over TP)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name, param, rule in _named_rules(model, arch):
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # the first stage exports the shared embedding
        full = _tp_gather(param.main_grad.detach() if grads else param.detach(), rule)
        yield from zip(rule.hf_names, _hf_from_full(rule, arch, full, tp), strict=True)


@torch.no_grad()
def iter_hf_weights(
    model, arch: Qwen3Arch, bucket_bytes: int = 512 << 20, grads: bool = False, to_host: bool = True
) -> Iterator[list]:
    """Yield the whole model as lists of (hf_name, tensor) of about bucket_bytes each, on every rank.
    grads=True yields the accumulated main_grad in the same layout (for parity checks and debugging).
    to_host=False leaves each tensor on the device it was gathered on (the NCCL weight broadcast
    sends GPU tensors; a host copy would cost a device->host transfer per byte and fail NCCL).

    Collective: every rank must drain the iterator. Stages are walked in order; each tensor is
    TP-gathered on its stage and broadcast to the other stages over the pipeline group.
    """
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    stage_ranks = torch.distributed.get_process_group_ranks(pp_group) if pp > 1 else []

    def every_stage() -> Iterator[tuple[str, torch.Tensor]]:
        for stage in range(pp):
            local = _local_hf_tensors(model, arch, grads) if stage == my_stage else None
            meta = (
                [[(n, tuple(t.shape), t.dtype) for n, t in _peek_meta(model, arch)]]
                if stage == my_stage
                else [None]
            )
            if pp > 1:
                torch.distributed.broadcast_object_list(meta, src=stage_ranks[stage], group=pp_group)
            for hf_name, shape, dtype in meta[0]:
                if local is not None:
                    got_name, tensor = next(local)
                    assert got_name == hf_name, (got_name, hf_name)
                else:
                    tensor = torch.empty(shape, dtype=dtype, device=_param_device(model))
                if pp > 1:
                    torch.distributed.broadcast(tensor, src=stage_ranks[stage], group=pp_group)
                yield hf_name, (tensor.cpu() if to_host else tensor)

    # `yield from`, not `return`: this stays a generator function, so no_grad covers every gather.
    yield from rebucket(every_stage(), bucket_bytes)


@torch.no_grad()
def iter_stage_hf_weights(model, arch: Qwen3Arch, bucket_bytes: int = 512 << 20) -> Iterator[list]:
    """This pipeline stage's own tensors under HF names, TP-gathered, in buckets of about bucket_bytes,
    on the device they were gathered on: what the stage's sender broadcasts to the engines itself
    (no relay over the pipeline). Collective over the stage's TP group."""
    yield from rebucket(_local_hf_tensors(model, arch), bucket_bytes)


def _param_device(model) -> torch.device:
    return next(_unwrap(model).parameters()).device


def _peek_meta(model, arch: Qwen3Arch) -> Iterator[tuple[str, torch.Tensor]]:
    """HF names and full shapes of this stage's tensors without communicating (meta tensors)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name, param, rule in _named_rules(model, arch):
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        shape = list(param.shape)
        if rule.kind != "replicated":
            shape[1 if rule.kind == "col" else 0] *= tp
        full = torch.empty(shape, dtype=param.dtype, device="meta")
        yield from zip(rule.hf_names, _hf_from_full(rule, arch, full, tp), strict=True)


HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def export_hf_checkpoint(
    model,
    arch: Qwen3Arch,
    source_dir: str | Path,
    out_dir: str | Path,
    max_shard_bytes: int = 4 << 30,
    dtype: torch.dtype | None = None,
) -> Path | None:
    """Write an HF safetensors checkpoint (collective; global rank 0 writes). Returns out_dir on rank 0."""
    from safetensors.torch import save_file

    is_writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for bucket in iter_hf_weights(model, arch, bucket_bytes=64 << 20):
        if not is_writer:
            continue
        for name, tensor in bucket:
            t = tensor if dtype is None else tensor.to(dtype)
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous()
            size += nbytes
    if not is_writer:
        return None
    out.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for fname in HF_SIDE_FILES:
        src = Path(source_dir) / fname
        if src.is_file():
            shutil.copyfile(src, out / fname)
    return out
