"""DistillSparse's LoRA adapter on the Megatron-Core policy, TP-sharded like its base, exported as PEFT.

The adapter is a separate module tree: it is not registered in the GPTModel, so the base's parameter
names, checkpoints, HF export and DDP buffers are untouched, and it is applied by forward hooks only
inside `adapter.enabled()` (the sparse rollout's path; the dense policy never sees it).

Layout (the Megatron-Bridge one): for a column-parallel base (linear_qkv, linear_fc1) A [r, in] is
replicated and B [out/tp, r] is sharded like the base's rows; for a row-parallel base (linear_proj,
linear_fc2) A [r, in/tp] is sharded like the base's input and B [out, r] is replicated. Megatron's own
TP mappings carry the gradients: copy_to (all-reduce of dL/dh) after a replicated A, reduce_from (the
all-reduce of the partial h) after a sharded A.

Fused Megatron modules map to several HF modules: linear_qkv -> q/k/v_proj (B rows split per query
group, A shared), linear_fc1 -> gate/up_proj (B split per TP shard, A shared). Sharing A is exact: each
HF module computes B_part (A x) * alpha / r.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer.config import ALL_LINEAR
from sparrow_megatron.trainer.model import Qwen3Arch
from sparrow_megatron.trainer.weights import _hf_from_full, _Rule, _shard_from_hf, _tp_gather, _unwrap

# HF target module -> (Megatron module inside a decoder layer, base parallelism, the fused HF group).
_TARGETS = {
    "q_proj": ("self_attention.linear_qkv", "col", ("q_proj", "k_proj", "v_proj")),
    "k_proj": ("self_attention.linear_qkv", "col", ("q_proj", "k_proj", "v_proj")),
    "v_proj": ("self_attention.linear_qkv", "col", ("q_proj", "k_proj", "v_proj")),
    "o_proj": ("self_attention.linear_proj", "row", ("o_proj",)),
    "gate_proj": ("mlp.linear_fc1", "col", ("gate_proj", "up_proj")),
    "up_proj": ("mlp.linear_fc1", "col", ("gate_proj", "up_proj")),
    "down_proj": ("mlp.linear_fc2", "row", ("down_proj",)),
}
_HF_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
_EXPORT_KIND = {"self_attention.linear_qkv": "qkv", "mlp.linear_fc1": "fc1"}
_HF_GROUP = {module: group for module, _, group in _TARGETS.values()}  # Megatron module -> its HF modules


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def megatron_targets(self) -> list[tuple[str, str]]:
        """[(megatron module, 'col'|'row')], checking fused groups are targeted whole."""
        if self.rank < 1:
            raise UserError(f"distill.rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.target_modules) - set(_TARGETS))
        if unknown:
            raise UserError(f"distill.target_modules: unknown {unknown}; choose from {sorted(_TARGETS)}")
        out: list[tuple[str, str]] = []
        for name in self.target_modules:
            module, kind, group = _TARGETS[name]
            missing = [g for g in group if g not in self.target_modules]
            if missing:
                raise UserError(
                    f"distill.target_modules: {name} is fused with {missing} in Megatron and SGLang; "
                    f"target {list(group)} together"
                )
            if (module, kind) not in out:
                out.append((module, kind))
        return out

    def hf_targets(self) -> list[str]:
        return [n for n in _TARGETS if n in self.target_modules]


_ENABLED: list[bool] = []


def _tp():
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )


class LoraLinear(torch.nn.Module):
    """The low-rank delta of one Megatron parallel linear (this rank's shard)."""

    def __init__(
        self, base: torch.nn.Module, kind: str, spec: LoraSpec, init_seed: int, sequence_parallel: bool
    ):
        super().__init__()
        tp, rank = _tp()
        out_local, in_local = base.weight.shape
        self.kind = kind
        self.scale = spec.scale
        self.sequence_parallel = sequence_parallel
        in_full = in_local * tp if kind == "row" else in_local
        # PEFT's default init: A kaiming-uniform (a = sqrt(5)), B zero. The full A is drawn identically on
        # every TP rank from one seed, so replicated copies agree and shards tile the same matrix.
        gen = torch.Generator().manual_seed(init_seed)
        a_full = torch.empty(spec.rank, in_full)
        bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform_ with a = sqrt(5)
        a_full.uniform_(-bound, bound, generator=gen)
        dev, dtype = base.weight.device, base.weight.dtype
        a = a_full.chunk(tp, dim=1)[rank] if kind == "row" else a_full
        self.lora_A = torch.nn.Parameter(a.contiguous().to(dev, dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, spec.rank, device=dev, dtype=dtype))
        # Which parameter is a TP shard (for the grad norm) and which grads differ across TP ranks.
        self.lora_A.tensor_model_parallel = kind == "row"
        self.lora_B.tensor_model_parallel = kind == "col"
        # Under sequence parallelism a replicated B of a row-parallel base sees one sequence shard per rank.
        self.lora_B.lora_tp_grad_sum = kind == "row" and sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tpl

        if self.kind == "col":
            if self.sequence_parallel:  # base input is a sequence shard; the base gathers it the same way
                x = tpl.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            h = tpl.copy_to_tensor_model_parallel_region(F.linear(x, self.lora_A))
            return F.linear(h, self.lora_B) * self.scale
        h = F.linear(x, self.lora_A)
        if self.sequence_parallel:
            h = tpl.reduce_scatter_to_sequence_parallel_region(h)
        else:
            h = tpl.reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.lora_B) * self.scale


def _hook(lora: LoraLinear, eps: float):
    def hook(module, inputs, output):
        if not _ENABLED or not _ENABLED[-1]:
            return None
        x = inputs[0]
        norm_weight = getattr(module, "layer_norm_weight", None)
        if norm_weight is not None:  # Transformer Engine fuses the pre-norm into the linear: apply it
            x = F.rms_norm(x, (x.shape[-1],), norm_weight, eps)
        out, bias = output
        return out + lora(x).to(out.dtype), bias

    return hook


class LoraAdapter(torch.nn.Module):
    """The adapters of this rank's decoder layers, keyed '<global layer>.<megatron module>'."""

    def __init__(self, model, arch: Qwen3Arch, spec: LoraSpec, config):
        super().__init__()
        self.spec = spec
        self.arch = arch
        self.targets = spec.megatron_targets()
        self.loras = torch.nn.ModuleDict()
        self._handles = []
        sp = bool(getattr(config, "sequence_parallel", False))
        for layer in _unwrap(model).decoder.layers:
            gid = layer.layer_number - 1
            for j, (path, kind) in enumerate(self.targets):
                base = layer.get_submodule(path)
                lora = LoraLinear(base, kind, spec, spec.seed * 1_000_003 + gid * 101 + j, sp)
                self.loras[self._key(gid, path)] = lora
                self._handles.append(base.register_forward_hook(_hook(lora, config.layernorm_epsilon)))

    @staticmethod
    def _key(gid: int, path: str) -> str:
        return f"{gid}:{path.replace('.', '/')}"  # ModuleDict keys cannot hold dots

    def entries(self) -> Iterator[tuple[int, str, LoraLinear]]:
        for key, lora in self.loras.items():
            gid, path = key.split(":")
            yield int(gid), path.replace("/", "."), lora

    @contextlib.contextmanager
    def enabled(self, on: bool = True) -> Iterator[None]:
        """Forwards inside add the adapter's delta (the sparse rollout policy's path)."""
        _ENABLED.append(on)
        try:
            yield
        finally:
            _ENABLED.pop()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ gradients

    def sync_grads(self) -> None:
        """Sum grads over DP (losses carry global normalisation) and where TP ranks saw sequence shards."""
        from megatron.core import parallel_state

        dp_group = parallel_state.get_data_parallel_group()
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if getattr(p, "lora_tp_grad_sum", False):
                torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
            if parallel_state.get_data_parallel_world_size() > 1:
                torch.distributed.all_reduce(p.grad, group=dp_group)

    def grad_norm(self) -> float:
        """L2 norm of the whole adapter's gradient: TP shards summed, replicated copies counted once."""
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        sq = torch.zeros((), dtype=torch.float64, device=next(self.parameters()).device)
        for p in self.parameters():
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
                sq += p.grad.double().pow(2).sum()
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sq, group=parallel_state.get_model_parallel_group())
        return float(sq.sqrt())

    # ------------------------------------------------------------------ layout-free state (checkpoints)

    @staticmethod
    def _split_rules(lora: LoraLinear, module: str) -> tuple[_Rule, _Rule]:
        """How lora_A and lora_B are split over TP, in weights.py's terms (see the module docstring)."""
        if lora.kind == "col":
            return _Rule("replicated", ()), _Rule(_EXPORT_KIND[module], ())
        return _Rule("col", ()), _Rule("replicated", ())

    def _tensors(self) -> Iterator[tuple[str, torch.nn.Parameter, _Rule]]:
        for gid, path, lora in self.entries():
            rule_a, rule_b = self._split_rules(lora, path)
            yield f"{gid}.{path}.lora_A", lora.lora_A, rule_a
            yield f"{gid}.{path}.lora_B", lora.lora_B, rule_b

    @torch.no_grad()
    def full_tensors(self, of: Callable[[torch.nn.Parameter], torch.Tensor] | None = None) -> dict:
        """Collective over TP and PP: every adapter tensor (or `of(param)`, e.g. an AdamW moment) in a
        form that does not depend on TP x PP (TP-gathered, fused modules split as in HF), keyed
        '<global layer>.<module>.lora_A|B'; returned on every rank."""
        tp, _ = _tp()
        out = {}
        for key, param, rule in self._tensors():
            full = _tp_gather((param if of is None else of(param)).detach(), rule)
            out[key] = [t.float().cpu().clone() for t in _hf_from_full(rule, self.arch, full, tp)]
        return _pp_union(out)

    @torch.no_grad()
    def local_shards(self, full: dict, source: str) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Inverse of `full_tensors` on this rank: (parameter, its shard of full[key]) for each one."""
        tp, rank = _tp()
        for key, param, rule in self._tensors():
            if key not in full:
                raise UserError(f"{source}: no adapter tensor {key} (saved with other target modules?)")
            try:
                shard = _shard_from_hf(rule, self.arch, full[key], tp, rank)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise UserError(f"{source}: adapter tensor {key} is malformed ({exc})") from exc
            if tuple(shard.shape) != tuple(param.shape):
                raise UserError(
                    f"{source}: adapter tensor {key} gives shape {tuple(shard.shape)} on tp rank {rank}/{tp}, "
                    f"expected {tuple(param.shape)} (saved with another LoRA rank?)"
                )
            yield param, shard.to(param.device, param.dtype)

    # ------------------------------------------------------------------ PEFT export

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The whole adapter under PEFT names (collective over TP and PP): `full_tensors` renamed, the
        shared A of a fused module copied to each of its HF modules."""
        full = self.full_tensors()
        out: dict[str, torch.Tensor] = {}
        for key in (k for k in full if k.endswith(".lora_A")):
            gid, module = key[: -len(".lora_A")].split(".", 1)
            (a,) = full[key]
            for name, b in zip(_HF_GROUP[module], full[f"{gid}.{module}.lora_B"], strict=True):
                prefix = f"base_model.model.model.layers.{gid}.{_HF_PARENT.get(name, 'mlp')}.{name}"
                out[f"{prefix}.lora_A.weight"] = a.clone()  # safetensors refuses tensors shared by names
                out[f"{prefix}.lora_B.weight"] = b
        return out

    def export_peft(self, out_dir: str | Path, base_model_path: str = "") -> Path | None:
        """Write `adapter_config.json` + `adapter_model.safetensors` (collective; global rank 0 writes).

        Loadable by `peft.PeftModel.from_pretrained` and SGLang's `/load_lora_adapter`."""
        import peft
        from safetensors.torch import save_file

        tensors = self.hf_tensors()
        written = None
        if torch.distributed.get_rank() == 0:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            config = peft.LoraConfig(
                r=self.spec.rank,
                lora_alpha=self.spec.alpha,
                target_modules=self.spec.hf_targets(),
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
                base_model_name_or_path=base_model_path or None,
            )
            config.save_pretrained(str(out))
            save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
            written = out
        torch.distributed.barrier()
        return written


def _pp_union(local: dict) -> dict:
    """Collective over PP: the union of every stage's dict (each stage holds its own layers' keys)."""
    from megatron.core import parallel_state

    stages = parallel_state.get_pipeline_model_parallel_world_size()
    if stages == 1:
        return local
    parts: list = [None] * stages
    torch.distributed.all_gather_object(
        parts, local, group=parallel_state.get_pipeline_model_parallel_group()
    )
    return {k: v for part in parts for k, v in part.items()}


def lora_spec_from(distill_cfg, seed: int = 0) -> LoraSpec:
    """LoraSpec from the run config's `DistillConfig` (rank, alpha, target_modules)."""
    targets: Sequence[str] = distill_cfg.target_modules
    return LoraSpec(
        rank=int(distill_cfg.rank), alpha=float(distill_cfg.alpha), target_modules=tuple(targets), seed=seed
    )
