"""`sparrow plan`: a job config against a GPU's memory (trainer stages and rollout engines), with a verdict
per role and the predicted rollout and step time. The keys of `Plan.to_dict()` are documented in
docs/memory_plan.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparrow_megatron.config import JobConfig
from sparrow_megatron.errors import UserError
from sparrow_megatron.plan.engine import EngineShape, engine_memory
from sparrow_megatron.plan.memory import GIB, trainer_memory
from sparrow_megatron.plan.shapes import TrainerShape
from sparrow_megatron.plan.timing import rollout_seconds, trainer_seconds
from sparrow_megatron.sparsity.cost import MODELS, ModelShape, resolve_hardware
from sparrow_megatron.sparsity.schedule import resolve_schedule

# Memory per GPU as the driver reports it (nvidia-smi's total: 81559 MiB on H100 SXM, 143771 MiB on
# H200 SXM); B200: the 180 GB of the DGX B200 datasheet.
DEVICE_BYTES = {"h100": 81559 * 2**20, "h200": 143771 * 2**20, "b200": 180e9}
# Above this share of the device a role still fits but leaves little for allocator fragmentation.
TIGHT_FRACTION = 0.92


def model_shape(cfg: JobConfig) -> ModelShape:
    """The HF config.json in model.hf_dir when it holds the shape, else the Qwen3 shape named by
    model.name (the recipes' placeholders name the size)."""
    if cfg.model.hf_dir:
        config = Path(cfg.model.hf_dir) / "config.json"
    else:
        from sparrow_megatron.data.recall import TINY_RECALL_DIR  # the embedded tiny Qwen3

        config = Path(TINY_RECALL_DIR) / "config.json"
    named = MODELS.get(cfg.model.name.lower())
    if config.is_file():
        try:
            return ModelShape.from_hf_config(config)
        except UserError:
            if named is None:
                raise
    if named is not None:
        return named
    raise UserError(
        f"field 'model.name': {cfg.model.name!r} is not a known Qwen3 size ({', '.join(MODELS)}) and "
        f"model.hf_dir={cfg.model.hf_dir!r} has no config.json to read the shape from"
    )


def trainer_shape(cfg: JobConfig, model: ModelShape, layer_spec: str = "te") -> TrainerShape:
    c, t = cfg.cluster, cfg.trainer
    gpus = c.trainer_nodes * c.gpus_per_node
    dp = max(gpus // (t.tp * t.pp * t.cp), 1)
    longest = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    samples = cfg.loop.prompts_per_step * cfg.rollout.n_samples
    mb_tokens = max(t.micro_batch_tokens, longest)  # a longer sample gets a micro-batch of its own
    per_rank_tokens = math.ceil(samples / dp) * longest
    return TrainerShape(
        model=model,
        tp=t.tp,
        pp=t.pp,
        cp=t.cp,
        dp=dp,
        sequence_parallel=t.use_sequence_parallel,
        recompute=t.recompute,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        micro_batch_tokens=mb_tokens,
        logprob_chunk_tokens=t.logprob_chunk_tokens,
        distributed_optimizer=True,
        layer_spec=layer_spec,
        num_micro_batches=max(1, math.ceil(per_rank_tokens / mb_tokens)),
    )


@dataclass
class RolePlan:
    role: str  # "trainer" or "engine"
    terms: dict[str, float]  # bytes per GPU
    device_bytes: float
    detail: dict[str, Any] = field(default_factory=dict)
    problem: str = ""  # why it does not fit beyond the total (e.g. the pool holds no full sequence)
    # Above this share of the device the verdict is "tight". An engine's KV pool takes whatever its
    # static budget leaves by design, so engines are never tight by their total.
    tight_fraction: float = TIGHT_FRACTION

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def verdict(self) -> str:
        if self.problem or self.total > self.device_bytes:
            return "does not fit"
        return "tight" if self.total > self.tight_fraction * self.device_bytes else "fits"

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "verdict": self.verdict,
            "total_gib": self.total / GIB,
            "device_gib": self.device_bytes / GIB,
            "terms_gib": {k: v / GIB for k, v in self.terms.items()},
            **({"problem": self.problem} if self.problem else {}),
            **self.detail,
        }


@dataclass
class Plan:
    job: str
    model: str
    hardware: str  # h100, h200, b200
    layer_spec: str
    settings: dict[str, Any]
    roles: list[RolePlan]
    time: dict[str, float]

    @property
    def fits(self) -> bool:
        return all(r.verdict != "does not fit" for r in self.roles)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "model": self.model,
            "hardware": self.hardware,
            "layer_spec": self.layer_spec,
            "fits": self.fits,
            "settings": self.settings,
            "roles": [r.to_dict() for r in self.roles],
            "time_s": self.time,
        }

    def refusal(self) -> str:
        """What `sparrow submit` prints for a job that does not fit: each failing role's numbers."""
        lines = [f"'{self.job}' does not fit on {self.hardware} ({self.layer_spec} layers), per GPU:"]
        for r in self.roles:
            if r.verdict != "does not fit":
                continue
            top = sorted(r.terms.items(), key=lambda kv: -kv[1])[:4]
            parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in top)
            why = f"; {r.problem}" if r.problem else ""
            lines.append(
                f"  {r.role}: {r.total / GIB:.1f} GiB of {r.device_bytes / GIB:.1f} GiB ({parts} GiB){why}"
            )
        return "\n".join(lines)


def make_plan(cfg: JobConfig, hardware: str = "h100", layer_spec: str = "te", mfu: float = 0.4) -> Plan:
    """The memory and time plan of `cfg` on GPUs of kind `hardware` (h100, h200, b200)."""
    hw_key = hardware.lower()
    if hw_key not in DEVICE_BYTES:
        raise UserError(f"--hardware: unknown '{hardware}', choose one of {', '.join(DEVICE_BYTES)}")
    if layer_spec not in ("te", "local"):
        raise UserError(f"layer spec must be 'te' or 'local', got {layer_spec!r}")
    hw, device = resolve_hardware(hw_key), float(DEVICE_BYTES[hw_key])
    model = model_shape(cfg)
    shape = trainer_shape(cfg, model, layer_spec)
    schedule = resolve_schedule(cfg.rollout.schedule)
    roles: list[RolePlan] = []

    for name, value, size in [
        ("trainer.tp", model.num_heads, cfg.trainer.tp),
        ("trainer.tp", model.num_kv_heads, cfg.trainer.tp),
        ("trainer.pp", model.num_layers, cfg.trainer.pp),
    ]:
        if value % size:  # validation checks this only when config.json exists; the plan needs it always
            raise UserError(f"field '{name}': {size} does not divide the model's {value}")
    if shape.recompute not in ("none", "selective", "full"):
        raise UserError(f"field 'trainer.recompute': {shape.recompute!r} is not none, selective or full")
    if shape.recompute_method not in ("uniform", "block"):
        raise UserError(
            f"field 'trainer.recompute_method': {shape.recompute_method!r} is not uniform or block"
        )
    stages = trainer_memory(shape)
    worst = max(stages, key=lambda st: st.total)
    roles.append(
        RolePlan(
            "trainer",
            worst.terms,
            device,
            detail={
                "stage": worst.stage,
                "micro_batches_in_flight": worst.in_flight,
                "stages_gib": [st.total / GIB for st in stages],
            },
        )
    )

    longest = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    engine = engine_memory(
        EngineShape(model, cfg.rollout.engine_tp, schedule, cfg.rollout.kv_pool_tokens, longest), device
    )
    roles.append(
        RolePlan(
            "engine",
            engine.terms,
            device,
            detail={
                "engines": cfg.rollout.engines,
                "engine_tp": cfg.rollout.engine_tp,
                "kv_pool_tokens": engine.pool_tokens,
                "full_length_sequences": engine.full_length_sequences,
            },
            problem=""
            if engine.full_length_sequences >= 1
            else f"the KV pool ({engine.pool_tokens} tokens) cannot hold one {longest}-token sequence",
            tight_fraction=1.0,
        )
    )

    seqs = cfg.loop.prompts_per_step * cfg.rollout.n_samples
    concurrency = max(1, min(cfg.rollout.max_inflight_per_engine, engine.full_length_sequences))
    time = {
        "rollout_dense": rollout_seconds(
            model, hw, None, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, seqs,
            cfg.rollout.n_samples, cfg.rollout.engines, cfg.rollout.engine_tp, concurrency,
        ),
    }  # fmt: skip
    if schedule is not None:
        time["rollout_sparse"] = rollout_seconds(
            model, hw, schedule, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, seqs,
            cfg.rollout.n_samples, cfg.rollout.engines, cfg.rollout.engine_tp, concurrency,
        )  # fmt: skip
    trainer_gpus = cfg.cluster.trainer_nodes * cfg.cluster.gpus_per_node
    time["trainer"] = trainer_seconds(model, shape, seqs * longest, longest, trainer_gpus, hw, mfu)
    time["step"] = time.get("rollout_sparse", time["rollout_dense"]) + time["trainer"]

    settings = {
        "tp": shape.tp, "pp": shape.pp, "cp": shape.cp, "dp": shape.dp,
        "sequence_parallel": shape.sequence_parallel, "recompute": shape.recompute,
        "recompute_method": shape.recompute_method, "recompute_num_layers": shape.recompute_num_layers,
        "micro_batch_tokens": shape.micro_batch_tokens, "logprob_chunk_tokens": shape.logprob_chunk_tokens,
        "micro_batches_per_rank": shape.num_micro_batches, "trainer_gpus": trainer_gpus,
        "schedule": schedule.name if schedule is not None else "dense", "mfu": mfu,
    }  # fmt: skip
    return Plan(cfg.name, model.name, hw_key, layer_spec, settings, roles, time)
