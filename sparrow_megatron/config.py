"""The job config of a Sparrow run: the sections its components own, composed, loaded and validated.

Each component owns its section next to its code (model/, data/, rollout/, reward/, trainer/, loop/,
launch/) and checks it in `problems(prefix)`; `validate` gathers every section's problems plus the
checks that span sections, and reports all of them at once, each naming its dotted field. A recipe is a
Python file defining `recipe() -> JobConfig`, or a YAML/JSON file with the same tree; overrides are
`key.sub=value` (sparrow_megatron.loader). Plain (mutable) dataclasses so NeMo-Run can wrap them in
`run.Config`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparrow_megatron import loader
from sparrow_megatron.data.config import DataConfig
from sparrow_megatron.errors import UserError
from sparrow_megatron.launch.config import ClusterConfig
from sparrow_megatron.loop.config import ControllerConfig, LoopConfig, MonitorConfig, TrackingConfig
from sparrow_megatron.models.config import ModelConfig, try_read_hf_config
from sparrow_megatron.reward.config import RewardConfig
from sparrow_megatron.rollout.config import RolloutConfig
from sparrow_megatron.trainer.config import DistillConfig, GRPOConfig, TrainerConfig
from sparrow_megatron.validation import Problems

__all__ = [
    "ClusterConfig", "ControllerConfig", "DataConfig", "DistillConfig", "GRPOConfig", "JobConfig",
    "LoopConfig", "ModelConfig", "MonitorConfig", "RewardConfig", "RolloutConfig", "TrackingConfig",
    "TrainerConfig",
    "apply_overrides", "from_dict", "load_config", "load_recipe", "validate",
]  # fmt: skip


@dataclass
class JobConfig:
    name: str = "sparrow"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.loop.run_dir)

    @property
    def mlflow_uri(self) -> str:
        """The tracking URI in force: the configured one, or mlflow.db beside the run directory."""
        if self.tracking.mlflow_uri:
            return self.tracking.mlflow_uri
        return f"sqlite:///{self.run_dir.resolve().parent / 'mlflow.db'}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, str | int | float | bool]:
        """Dotted keys -> scalar values (lists and mappings as JSON): the MLflow params."""
        return _flatten(self.to_dict())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = json.loads(json.dumps(self.to_dict(), default=str))  # tuples -> lists, paths -> str
        text = (
            json.dumps(data, indent=2) + "\n"
            if path.suffix == ".json"
            else yaml.safe_dump(data, sort_keys=False)
        )
        path.write_text(text)
        return path


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "columns":
            out.update(_flatten(value, name + "."))
        elif isinstance(value, list | tuple | dict):
            out[name] = json.dumps(value, sort_keys=True, default=str)
        elif value is None:
            out[name] = "None"
        elif isinstance(value, Path):
            out[name] = str(value)
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Loading: mappings, recipe files, overrides (the field types are the schema; see loader.py).


def from_dict(data: Any, source: str = "config") -> JobConfig:
    """A JobConfig from a (possibly partial) nested mapping; missing fields keep their defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: a job config must be a mapping, got {type(data).__name__}")
    return loader.build(JobConfig, data, source)


def apply_overrides(
    cfg: JobConfig, overrides: list[str] | tuple[str, ...], source: str = "override"
) -> JobConfig:
    """A copy of `cfg` with `key.sub=value` overrides applied, each coerced to its field's type."""
    return loader.apply_overrides(cfg, overrides, source)


def load_recipe(path: str | Path) -> JobConfig:
    """A JobConfig from a Python recipe (`recipe()` returning a JobConfig, a NeMo-Run
    `run.Config(JobConfig, ...)` or a mapping) or a YAML/JSON file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    if path.suffix != ".py":
        if path.suffix not in (".json", ".yaml", ".yml"):
            raise UserError(f"{path}: a recipe must be .py, .yaml, .yml or .json")
        return from_dict(loader.read_data_file(path, "recipe"), source=str(path))
    fn = getattr(loader.load_python(path, "recipe"), "recipe", None)
    if not callable(fn):
        raise UserError(f"{path}: a Python recipe must define `recipe() -> JobConfig`")
    try:
        cfg = fn()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: recipe() failed ({type(err).__name__}: {err})") from err
    if any(c.__module__.startswith("fiddle") for c in type(cfg).__mro__):
        import fiddle  # a NeMo-Run `run.Config(JobConfig, ...)` recipe: build it into the dataclass

        try:
            cfg = fiddle.build(cfg)
        except Exception as err:
            raise UserError(
                f"{path}: building the recipe's run.Config failed ({type(err).__name__}: {err})"
            ) from err
    if isinstance(cfg, dict):
        return from_dict(cfg, source=str(path))
    if not isinstance(cfg, JobConfig):
        raise UserError(f"{path}: recipe() returned {type(cfg).__name__}, expected a JobConfig")
    # Re-check the types a Python recipe assigned (dataclasses do not check them).
    return from_dict(cfg.to_dict(), source=str(path))


def load_config(
    recipe: str | Path | JobConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    check_paths: bool = True,
) -> JobConfig:
    """Recipe (file, JobConfig or None = defaults) + overrides, validated: what `sparrow train` runs."""
    if recipe is None:
        cfg = JobConfig()
    elif isinstance(recipe, JobConfig):
        cfg = copy.deepcopy(recipe)
    else:
        cfg = load_recipe(recipe)
    cfg = apply_overrides(cfg, overrides)
    validate(cfg, check_paths=check_paths)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Validation: every section's problems and the cross-section checks, in one UserError.


def validate(cfg: JobConfig, check_paths: bool = True) -> None:
    found = problems(cfg, check_paths)
    if found:
        head = f"invalid job config '{cfg.name}' ({len(found)} problem{'s' * (len(found) > 1)}):"
        raise UserError("\n  ".join([head, *found]))


def problems(cfg: JobConfig, check_paths: bool = True) -> list[str]:
    """Every problem of the job config, each naming its dotted field."""
    from sparrow_megatron.sparsity.schedule import resolve_schedule

    try:
        schedule = resolve_schedule(cfg.rollout.schedule)
    except UserError:
        schedule = None  # reported by the rollout section
    geometry = schedule.geometry if schedule is not None else None
    found = [
        *cfg.model.problems(check_paths=check_paths),
        *cfg.data.problems(check_paths=check_paths),
        *cfg.rollout.problems(),
        *cfg.reward.problems(),
        *cfg.monitor.problems(),
        *cfg.monitor.controller.problems(
            page_size=geometry.page_size if geometry else 16,
            min_budget=geometry.min_budget if geometry else 48,
        ),
        *cfg.grpo.problems(),
        *cfg.distill.problems(),
        *cfg.trainer.problems(),
        *cfg.loop.problems(),
        *cfg.tracking.problems(),
        *cfg.cluster.problems(),
    ]
    p = Problems()
    _schedule_problems(cfg, schedule, p)
    _placement_problems(cfg, p)
    _model_problems(cfg, p)
    p.need(
        cfg.loop.eval_every == 0 or bool(cfg.data.eval_sets()) or cfg.data.kind == "synthetic",
        "loop.eval_every",
        f"periodic evaluation of data.kind={cfg.data.kind!r} needs held-out prompts: "
        "data.eval={name: path, ...} (or data.eval_path)",
    )
    p.need(
        cfg.grpo.overlong != "penalty" or cfg.grpo.overlong_buffer < cfg.data.max_response_tokens,
        "grpo.overlong_buffer",
        f"{cfg.grpo.overlong_buffer} must be below data.max_response_tokens {cfg.data.max_response_tokens}",
    )
    return found + p


def _schedule_problems(cfg: JobConfig, schedule, p: Problems) -> None:
    """The controller and DistillSparse act on a sparse schedule; the controller bins like it."""
    resolvable = schedule is not None or cfg.rollout.schedule == "dense"
    if cfg.monitor.controller.enabled and resolvable:
        p.need(
            schedule is not None,
            "monitor.controller.enabled",
            "the controller adjusts a sparse schedule, but rollout.schedule is 'dense'",
        )
        if schedule is not None:
            p.need(
                schedule.bin_width == cfg.monitor.bin_width,
                "monitor.bin_width",
                f"{cfg.monitor.bin_width} differs from the schedule's bin width {schedule.bin_width}; the "
                "controller needs the tails binned like the schedule",
            )
    p.need(
        not (cfg.distill.enabled and cfg.trainer.cp > 1),
        "trainer.cp",
        f"is {cfg.trainer.cp}, but DistillSparse's sparse forward runs per sequence without context "
        "parallelism; use cp=1 with distill.enabled",
    )
    if cfg.distill.enabled and resolvable:
        p.need(
            schedule is not None,
            "distill.enabled",
            "DistillSparse trains the sparse rollout's adapter, but rollout.schedule is dense",
        )
    fixed = cfg.distill.fixed_budget
    if cfg.distill.budget_mode == "fixed" and fixed is not None and fixed > 0 and schedule is not None:
        geo = schedule.geometry
        p.need(
            fixed % geo.page_size == 0 and fixed >= geo.min_budget,
            "distill.fixed_budget",
            f"{fixed} must be a multiple of the schedule's page size {geo.page_size} and at least "
            f"{geo.min_budget} (its sink + local pages)",
        )


def _placement_problems(cfg: JobConfig, p: Problems) -> None:
    """Parallelism against the machines: TP groups stay inside a node (NVLink); PP x DP span nodes."""
    c, r, t = cfg.cluster, cfg.rollout, cfg.trainer
    gpus = c.nodes * c.gpus_per_node
    if gpus:
        trainer_gpus = (c.nodes - c.rollout_nodes) * c.gpus_per_node
        rollout_gpus = c.rollout_nodes * c.gpus_per_node or gpus
        model_parallel = t.tp * t.pp * t.cp
        p.need(
            trainer_gpus > 0 and trainer_gpus % model_parallel == 0,
            "trainer.tp",
            f"tp*pp*cp = {model_parallel} must divide the trainer's {trainer_gpus} GPUs",
        )
        p.need(
            t.tp <= c.gpus_per_node,
            "trainer.tp",
            f"{t.tp} is more than cluster.gpus_per_node={c.gpus_per_node}",
        )
        p.need(
            r.engines * r.engine_tp <= rollout_gpus,
            "rollout.engines",
            f"{r.engines} engines x TP {r.engine_tp} need more than the {rollout_gpus} rollout GPUs",
        )
        p.need(
            r.engine_tp <= c.gpus_per_node,
            "rollout.engine_tp",
            f"{r.engine_tp} is more than cluster.gpus_per_node={c.gpus_per_node}",
        )
    if c.executor != "slurm":
        return
    # The disaggregated Slurm job: engines spread evenly over the rollout nodes.
    if c.rollout_nodes >= 1:
        p.need(
            r.engines % c.rollout_nodes == 0,
            "rollout.engines",
            f"{r.engines} engines do not spread evenly over cluster.rollout_nodes={c.rollout_nodes}",
        )
    if c.gpus_per_node:
        p.need(
            c.gpus_per_node % t.tp == 0,
            "trainer.tp",
            f"{t.tp} does not divide cluster.gpus_per_node={c.gpus_per_node}",
        )
        p.need(
            c.gpus_per_node % r.engine_tp == 0,
            "rollout.engine_tp",
            f"{r.engine_tp} does not divide cluster.gpus_per_node={c.gpus_per_node}",
        )
    else:
        p.need(
            t.tp * t.pp == 1 and r.engine_tp == 1,
            "trainer.tp",
            "CPU nodes (cluster.gpus_per_node=0) run one trainer process and TP-1 engines",
        )


def _model_problems(cfg: JobConfig, p: Problems) -> None:
    """Parallelism and lengths against the model's config.json."""
    model = try_read_hf_config(cfg.model.hf_dir) if cfg.model.hf_dir else None
    if model is None:
        return
    heads = model.get("num_attention_heads")
    kv_heads = model.get("num_key_value_heads", heads)
    layers = model.get("num_hidden_layers")
    t, r = cfg.trainer, cfg.rollout
    if isinstance(heads, int):
        p.need(heads % t.tp == 0, "trainer.tp", f"{t.tp} does not divide the model's {heads} attention heads")
        p.need(
            heads % r.engine_tp == 0,
            "rollout.engine_tp",
            f"{r.engine_tp} does not divide the model's {heads} attention heads",
        )
    if isinstance(kv_heads, int):
        p.need(
            kv_heads % t.tp == 0,
            "trainer.tp",
            f"{t.tp} does not divide the model's {kv_heads} KV heads (query groups)",
        )
    if isinstance(layers, int):
        p.need(layers % t.pp == 0, "trainer.pp", f"{t.pp} does not divide the model's {layers} layers")
        per_stage = layers // max(t.pp, 1)
        p.need(
            t.recompute != "full" or t.recompute_num_layers <= per_stage,
            "trainer.recompute_num_layers",
            f"{t.recompute_num_layers} is more than the {per_stage} layers per pipeline stage",
        )
    max_pos = model.get("max_position_embeddings")
    total = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    # RoPE scaling (YaRN) legitimately runs past max_position_embeddings.
    if isinstance(max_pos, int) and not model.get("rope_scaling"):
        p.need(
            total <= max_pos,
            "data.max_response_tokens",
            f"prompt + response = {total} tokens exceeds max_position_embeddings {max_pos}",
        )
