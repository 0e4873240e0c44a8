"""The one typed config tree of a Sparrow job, its loading (recipes, files, overrides) and validation.

A recipe is a Python file defining `recipe() -> JobConfig`, or a YAML/JSON file with the same tree.
Command-line overrides are `key.sub=value`, coerced to the dataclass field's type. `validate` runs
before anything starts and names the offending field in every message. Plain (mutable) dataclasses so
NeMo-Run can wrap them in `run.Config`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparrow_megatron.errors import UserError

DataKind = Literal["synthetic", "math", "code"]
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
LrSchedule = Literal["constant", "cosine", "linear"]
TailSignal = Literal["estimate", "lower", "upper"]
Executor = Literal["local", "slurm"]


@dataclass
class ModelConfig:
    # An HF Qwen3 directory (config.json, safetensors, tokenizer). Empty: the embedded tiny Qwen3
    # that the loop builds in the run directory.
    hf_dir: str = ""
    name: str = "tiny-qwen3"


@dataclass
class DataConfig:
    kind: DataKind = "synthetic"
    train_path: str = ""  # jsonl/parquet for math and code; unused by the synthetic task
    eval_path: str = ""
    # Dataset column -> role, e.g. {"problem": "prompt", "answer": "answer"}; empty = the loader's default.
    columns: dict[str, str] = field(default_factory=dict)
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256  # generation cutoff: 37K in the math recipes, 24K for code
    shuffle: bool = True
    # Synthetic task: cycle through the first N train examples (epochs over a fixed set, like a dataset
    # file); 0 = a fresh example for every prompt.
    train_size: int = 0


@dataclass
class RolloutConfig:
    engines: int = 1
    engine_tp: int = 1
    n_samples: int = 8  # per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k_logprobs: int = 20
    # A preset name (sparsity.schedule.PRESETS), a schedule file, or "dense". Page geometry and the
    # dense layers come from the schedule.
    schedule: str = "dense"
    attention_backend: str = "sparrow"
    timeout_s: float = 600.0
    kv_pool_tokens: int = 0  # SGLang --max-total-tokens per engine; 0 = its default for the device
    # Requests in flight per engine. 1 makes CPU rollouts bit-reproducible (each request decodes alone,
    # so batch composition cannot move the float bits) at the cost of batching.
    max_inflight_per_engine: int = 64
    # Trainer -> engines weight path: "http" (update_weights_from_tensor, works anywhere) or
    # "distributed" (one broadcast group, NCCL on GPU / gloo on CPU; at SPARROW_WEIGHT_SYNC_ADDR on Slurm).
    weight_sync: Literal["http", "distributed"] = "http"
    # Attach mode: base URLs (http://host:port) of running engines instead of launching `engines`.
    # ["env"] resolves them at loop start from the Slurm job's env contract (launch/contract.py).
    urls: list[str] = field(default_factory=list)
    server_args: list[str] = field(default_factory=list)  # extra SGLang flags for every engine


@dataclass
class ControllerConfig:
    """Online budget controller: off by default; acts per position bin on the live p5."""

    enabled: bool = False
    margin: float = 0.02  # raise below tau - margin, lower above tau + margin
    patience: int = 5  # consecutive steps above tau + margin before lowering
    min_budget: int = 256
    max_budget: int = 16384
    # Budgets the controller moves between (multiples of the page size); empty = steps of step_tokens.
    ladder: list[int] = field(default_factory=list)
    step_tokens: int = 256  # 16 pages of 16 tokens, the calibration grid


@dataclass
class MonitorConfig:
    tau: float = 0.86
    bin_width: int = 2000
    consecutive_steps: int = 3  # k: steps with p5 < tau in a bin before the warning
    min_bin_tokens: int = 20  # a bin with fewer tokens is not "populated": its p5 is noise
    signal: TailSignal = "estimate"  # which acceptance value the p5 is taken of (lower = conservative)
    beta_fit: bool = False  # the per-step Beta fit costs time; calibration does it
    controller: ControllerConfig = field(default_factory=ControllerConfig)


@dataclass
class GRPOConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0
    tis_cap: float = 2.0
    kl_coef: float = 0.0
    loss_agg: LossAgg = "token-mean"
    adv_eps: float = 1e-6


@dataclass
class DistillConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    # SGLang fuses q/k/v and gate/up: an adapter must target each fused group whole.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    kl_lambda: float = 1e-3
    lr: float = 1e-4


@dataclass
class TrainerConfig:
    tp: int = 1
    pp: int = 1
    lr: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: LrSchedule = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 16384
    dtype: Literal["fp32", "bf16"] = "bf16"


@dataclass
class LoopConfig:
    steps: int = 20
    prompts_per_step: int = 8
    # Periodic evaluation (dense and sparse, mean@k / pass@k on held-out prompts): before the first step
    # and after every eval_every-th and the last. 0 = none.
    eval_every: int = 0
    eval_prompts: int = 0  # the first N of the eval split; 0 = prompts_per_step
    eval_samples: int = 4  # k
    eval_pass_reward: float = 1.0  # a sample passes (for pass@k) when its reward reaches this
    checkpoint_every: int = 10  # 0 = only the final checkpoint
    seed: int = 0
    run_dir: str = "runs/sparrow"


@dataclass
class TrackingConfig:
    mlflow_uri: str = ""  # empty = sqlite:///<run_dir>/mlflow.db
    experiment: str = "sparrow"
    run_name: str = ""


@dataclass
class ClusterConfig:
    """The machines and, for the slurm executor, the job: `sparrow submit` turns it into a LaunchSpec."""

    executor: Executor = "local"
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU (the embedded default; CPU Slurm nodes run one trainer process)
    rollout_nodes: int = 0  # of `nodes`, given to the rollout fleet (0 = colocated / local)
    # Slurm: sbatch options of the heterogeneous job (rollout group + trainer group).
    account: str = ""
    partition: str = ""
    time_limit: str = "04:00:00"
    # pyxis: both groups run in this image with these `src:dst[:flags]` mounts; empty = plain srun.
    container_image: str = ""
    container_mounts: list[str] = field(default_factory=list)
    # NeMo-Run's home: experiments, sbatch scripts and logs live under <job_dir>/experiments/<name>/.
    job_dir: str = "~/.sparrow/jobs"
    # The interpreter on the nodes (must import sparrow_megatron; the image's python in containers).
    python: str = "python3"
    env: dict[str, str] = field(default_factory=dict)
    engine_base_port: int = 30010  # engine i of a rollout node serves on engine_base_port + i
    rdzv_port: int = 29500  # torchrun rendezvous of the trainer group
    # How long the trainer waits for every engine's /health (SGLang start-up, model load).
    rollout_start_timeout_s: float = 1800.0
    requeue_signal_s: int = 300  # USR1 this long before the time limit: requeue, resume from checkpoint
    max_retries: int = 0  # requeues after a failed exit

    @property
    def trainer_nodes(self) -> int:
        return self.nodes - self.rollout_nodes


@dataclass
class JobConfig:
    name: str = "sparrow"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
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
        """The tracking URI in force: the configured one, or a sqlite file in the run directory."""
        if self.tracking.mlflow_uri:
            return self.tracking.mlflow_uri
        return f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"

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
# Building from mappings and overrides, with the field types as the schema.


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """`value` (from YAML/JSON, a Python recipe or a parsed override) checked and converted to `tp`."""

    def bad() -> UserError:
        return UserError(f"{source}: field '{name}': expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{source}: field '{name}': expected a mapping, got {value!r}")
        return _build(tp, value, source, name + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name, source)
            except UserError:
                pass
        raise bad()
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{name}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise bad()
        return tuple(
            _coerce(v, a, f"{name}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if tp is Path:
        if not isinstance(value, str | Path):
            raise bad()
        return Path(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, name, source): _coerce(v, vt, f"{name}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"config field '{name}' has an unsupported type {tp}")  # a bug in this module


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        names = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise UserError(f"{source}: unknown field(s) {names}; known: {', '.join(sorted(hints))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: Any, source: str = "config") -> JobConfig:
    """A JobConfig from a (possibly partial) nested mapping; missing fields keep their defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: a job config must be a mapping, got {type(data).__name__}")
    return _build(JobConfig, data, source)


_BOOL_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _parse_text(text: str, tp: Any, name: str) -> Any:
    """An override's text turned into a value of `tp` (then checked by `_coerce`)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() in ("none", "null", "~") and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return _parse_text(text, args[0], name)
    if tp is str or (origin is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return text
    if tp is bool:
        word = text.strip().lower()
        if word not in _BOOL_WORDS:
            raise UserError(f"override '{name}={text}': expected a boolean (true/false), got {text!r}")
        return _BOOL_WORDS[word]
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise UserError(f"override '{name}={text}': expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"override '{name}={text}': expected a number, got {text!r}") from None
    if tp is Path:
        return text
    if origin in (list, tuple):
        stripped = text.strip()
        if not stripped.startswith(("[", "(")):
            args = typing.get_args(tp)
            parts = [p.strip() for p in stripped.split(",") if p.strip()]
            items = args[:1] * len(parts) if origin is list or args[-1:] == (Ellipsis,) else args
            if len(items) != len(parts):
                raise UserError(f"override '{name}={text}': expected {len(items)} comma-separated values")
            return [_parse_text(p, item, name) for p, item in zip(parts, items, strict=True)]
        if stripped.startswith("("):
            text = "[" + stripped[1:-1] + "]" if stripped.endswith(")") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"override '{name}={text}': cannot parse the value ({err})") from None


def apply_overrides(
    cfg: JobConfig, overrides: list[str] | tuple[str, ...], source: str = "override"
) -> JobConfig:
    """A copy of `cfg` with `key.sub=value` overrides applied, each coerced to its field's type."""
    cfg = copy.deepcopy(cfg)  # the result shares nothing mutable with the input
    for item in overrides:
        if "=" not in item:
            raise UserError(f"{source} '{item}': expected key.sub=value")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        target: Any = cfg
        for depth, part in enumerate(parts):
            hints = _hints(type(target))
            if part not in hints:
                where_ = ".".join(parts[:depth]) or "the job config"
                raise UserError(
                    f"{source} '{item}': unknown field '{key}' ({where_} has: {', '.join(sorted(hints))})"
                )
            tp = hints[part]
            if depth < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise UserError(
                        f"{source} '{item}': field '{'.'.join(parts[: depth + 1])}' has no sub-fields"
                    )
                target = getattr(target, part)
                continue
            if dataclasses.is_dataclass(tp):
                raise UserError(f"{source} '{item}': field '{key}' is a section; set one of its fields")
            value = _coerce(_parse_text(text, tp, key), tp, key, f"{source} '{item}'")
            cfg = _replaced(cfg, parts, value)
    return cfg


def _replaced(obj: Any, parts: list[str], value: Any) -> Any:
    """A copy of the dataclass `obj` with the field at `parts` set; works for frozen dataclasses too."""
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    return dataclasses.replace(obj, **{parts[0]: _replaced(getattr(obj, parts[0]), parts[1:], value)})


def load_recipe(path: str | Path) -> JobConfig:
    """A JobConfig from a Python recipe (`recipe()` returning a JobConfig, a NeMo-Run
    `run.Config(JobConfig, ...)` or a mapping) or a YAML/JSON file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    if path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"sparrow_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{path}: the recipe failed to import ({type(err).__name__}: {err})") from err
        fn = getattr(module, "recipe", None)
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
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"{path}: cannot read recipe ({err.strerror})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise UserError(f"{path}: a recipe must be .py, .yaml, .yml or .json")
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return from_dict(data, source=str(path))


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
# Validation: every problem found, each naming its field, in one UserError.


def read_model_config(hf_dir: str | Path) -> dict[str, Any] | None:
    """The HF config.json of a model directory, or None when there is none to read."""
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def validate(cfg: JobConfig, check_paths: bool = True) -> None:
    problems = _problems(cfg, check_paths)
    if problems:
        head = f"invalid job config '{cfg.name}' ({len(problems)} problem{'s' * (len(problems) > 1)}):"
        raise UserError("\n  ".join([head, *problems]))


def _problems(cfg: JobConfig, check_paths: bool) -> list[str]:
    from sparrow_megatron.sparsity.schedule import resolve_schedule

    p: list[str] = []

    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            p.append(f"field '{name}': {message}")

    # Scalars that must be positive / in range.
    for name, value in [
        ("rollout.engines", cfg.rollout.engines),
        ("rollout.engine_tp", cfg.rollout.engine_tp),
        ("rollout.n_samples", cfg.rollout.n_samples),
        ("rollout.max_inflight_per_engine", cfg.rollout.max_inflight_per_engine),
        ("rollout.top_k_logprobs", cfg.rollout.top_k_logprobs),
        ("data.max_prompt_tokens", cfg.data.max_prompt_tokens),
        ("data.max_response_tokens", cfg.data.max_response_tokens),
        ("monitor.bin_width", cfg.monitor.bin_width),
        ("monitor.consecutive_steps", cfg.monitor.consecutive_steps),
        ("monitor.min_bin_tokens", cfg.monitor.min_bin_tokens),
        ("monitor.controller.patience", cfg.monitor.controller.patience),
        ("trainer.tp", cfg.trainer.tp),
        ("trainer.pp", cfg.trainer.pp),
        ("trainer.micro_batch_tokens", cfg.trainer.micro_batch_tokens),
        ("loop.steps", cfg.loop.steps),
        ("loop.prompts_per_step", cfg.loop.prompts_per_step),
        ("loop.eval_samples", cfg.loop.eval_samples),
        ("distill.rank", cfg.distill.rank),
        ("cluster.nodes", cfg.cluster.nodes),
    ]:
        need(value >= 1, name, f"must be >= 1, got {value}")
    for name, value in [
        ("loop.eval_every", cfg.loop.eval_every),
        ("loop.eval_prompts", cfg.loop.eval_prompts),
        ("loop.checkpoint_every", cfg.loop.checkpoint_every),
        ("data.train_size", cfg.data.train_size),
        ("trainer.warmup_steps", cfg.trainer.warmup_steps),
        ("cluster.gpus_per_node", cfg.cluster.gpus_per_node),
        ("cluster.rollout_nodes", cfg.cluster.rollout_nodes),
    ]:
        need(value >= 0, name, f"must be >= 0, got {value}")
    for name, value in [
        ("rollout.temperature", cfg.rollout.temperature),
        ("rollout.timeout_s", cfg.rollout.timeout_s),
        ("trainer.lr", cfg.trainer.lr),
        ("distill.lr", cfg.distill.lr),
        ("distill.alpha", cfg.distill.alpha),
        ("grpo.dual_clip", cfg.grpo.dual_clip),
        ("grpo.tis_cap", cfg.grpo.tis_cap),
    ]:
        need(math.isfinite(value) and value > 0, name, f"must be a positive number, got {value}")
    for name, value in [
        ("grpo.kl_coef", cfg.grpo.kl_coef),
        ("grpo.adv_eps", cfg.grpo.adv_eps),
        ("distill.kl_lambda", cfg.distill.kl_lambda),
        ("trainer.weight_decay", cfg.trainer.weight_decay),
        ("trainer.grad_clip", cfg.trainer.grad_clip),
        ("monitor.controller.margin", cfg.monitor.controller.margin),
    ]:
        need(math.isfinite(value) and value >= 0, name, f"must be >= 0, got {value}")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {cfg.rollout.top_p}")
    need(0 < cfg.monitor.tau < 1, "monitor.tau", f"must be in (0, 1), got {cfg.monitor.tau}")
    need(0 <= cfg.grpo.eps_low < 1, "grpo.eps_low", f"must be in [0, 1), got {cfg.grpo.eps_low}")
    need(cfg.grpo.eps_high >= 0, "grpo.eps_high", f"must be >= 0, got {cfg.grpo.eps_high}")
    need(
        cfg.grpo.dual_clip > 1,
        "grpo.dual_clip",
        f"must be > 1 (it bounds rho*A from below), got {cfg.grpo.dual_clip}",
    )
    need(cfg.grpo.tis_cap >= 1, "grpo.tis_cap", f"must be >= 1, got {cfg.grpo.tis_cap}")
    need(
        bool(cfg.distill.target_modules) or not cfg.distill.enabled,
        "distill.target_modules",
        "is empty while distill.enabled",
    )
    need(
        cfg.rollout.n_samples >= 2,
        "rollout.n_samples",
        f"GRPO needs >= 2 samples per prompt for a group advantage, got {cfg.rollout.n_samples}",
    )
    need(bool(cfg.loop.run_dir), "loop.run_dir", "is empty")
    need(bool(cfg.tracking.experiment), "tracking.experiment", "is empty")

    # Schedule: resolvable, and consistent with the controller.
    schedule = None
    try:
        schedule = resolve_schedule(cfg.rollout.schedule)
    except UserError as err:
        p.append(f"field 'rollout.schedule': {err}")
    ctl = cfg.monitor.controller
    geometry_page = schedule.geometry.page_size if schedule is not None else 16
    min_budget = schedule.geometry.min_budget if schedule is not None else 48
    need(
        ctl.min_budget <= ctl.max_budget,
        "monitor.controller.min_budget",
        f"{ctl.min_budget} is above monitor.controller.max_budget {ctl.max_budget}",
    )
    need(
        ctl.min_budget >= min_budget,
        "monitor.controller.min_budget",
        f"must hold the sink and local pages ({min_budget} tokens), got {ctl.min_budget}",
    )
    for name, value in [
        ("monitor.controller.min_budget", ctl.min_budget),
        ("monitor.controller.max_budget", ctl.max_budget),
        ("monitor.controller.step_tokens", ctl.step_tokens),
    ]:
        need(
            value > 0 and value % geometry_page == 0,
            name,
            f"must be a positive multiple of the page size {geometry_page}, got {value}",
        )
    for i, b in enumerate(ctl.ladder):
        need(
            b % geometry_page == 0 and ctl.min_budget <= b <= ctl.max_budget,
            f"monitor.controller.ladder[{i}]",
            f"{b} must be a multiple of the page size {geometry_page} within [min_budget, max_budget]",
        )
    if ctl.enabled:
        need(
            schedule is not None,
            "monitor.controller.enabled",
            "the controller adjusts a sparse schedule, but rollout.schedule is 'dense'",
        )
        if schedule is not None:
            need(
                schedule.bin_width == cfg.monitor.bin_width,
                "monitor.bin_width",
                f"{cfg.monitor.bin_width} differs from the schedule's bin width {schedule.bin_width}; the "
                "controller needs the tails binned like the schedule",
            )

    # Parallelism against the machines and the model.
    gpus = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if cfg.cluster.executor == "slurm":
        p.extend(_slurm_problems(cfg))
    if gpus:
        trainer_gpus = (cfg.cluster.nodes - cfg.cluster.rollout_nodes) * cfg.cluster.gpus_per_node
        rollout_gpus = cfg.cluster.rollout_nodes * cfg.cluster.gpus_per_node or gpus
        model_parallel = cfg.trainer.tp * cfg.trainer.pp
        need(
            trainer_gpus > 0 and trainer_gpus % model_parallel == 0,
            "trainer.tp",
            f"tp*pp = {model_parallel} must divide the trainer's {trainer_gpus} GPUs",
        )
        need(
            cfg.trainer.tp <= cfg.cluster.gpus_per_node,
            "trainer.tp",
            f"{cfg.trainer.tp} is more than cluster.gpus_per_node={cfg.cluster.gpus_per_node}",
        )
        need(
            cfg.rollout.engines * cfg.rollout.engine_tp <= rollout_gpus,
            "rollout.engines",
            f"{cfg.rollout.engines} engines x TP {cfg.rollout.engine_tp} need more than the "
            f"{rollout_gpus} rollout GPUs",
        )
        need(
            cfg.rollout.engine_tp <= cfg.cluster.gpus_per_node,
            "rollout.engine_tp",
            f"{cfg.rollout.engine_tp} is more than cluster.gpus_per_node={cfg.cluster.gpus_per_node}",
        )

    for i, url in enumerate(cfg.rollout.urls):
        need(
            url.startswith(("http://", "https://")) or (url == "env" and len(cfg.rollout.urls) == 1),
            f"rollout.urls[{i}]",
            f"{url!r} is not an http(s):// base URL (or the single word 'env': from the Slurm job)",
        )

    if cfg.model.hf_dir:
        hf = Path(cfg.model.hf_dir)
        model = read_model_config(hf)
        if check_paths and not hf.is_dir():
            p.append(f"field 'model.hf_dir': {hf} does not exist")
        elif check_paths and model is None:
            p.append(f"field 'model.hf_dir': {hf / 'config.json'} is missing or not valid JSON")
        if model is not None:
            heads = model.get("num_attention_heads")
            kv_heads = model.get("num_key_value_heads", heads)
            layers = model.get("num_hidden_layers")
            if isinstance(heads, int):
                need(
                    heads % cfg.trainer.tp == 0,
                    "trainer.tp",
                    f"{cfg.trainer.tp} does not divide the model's {heads} attention heads",
                )
                need(
                    heads % cfg.rollout.engine_tp == 0,
                    "rollout.engine_tp",
                    f"{cfg.rollout.engine_tp} does not divide the model's {heads} attention heads",
                )
            if isinstance(kv_heads, int):
                need(
                    kv_heads % cfg.trainer.tp == 0,
                    "trainer.tp",
                    f"{cfg.trainer.tp} does not divide the model's {kv_heads} KV heads (query groups)",
                )
            if isinstance(layers, int):
                need(
                    layers % cfg.trainer.pp == 0,
                    "trainer.pp",
                    f"{cfg.trainer.pp} does not divide the model's {layers} layers",
                )
            max_pos = model.get("max_position_embeddings")
            total = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
            # RoPE scaling (YaRN) legitimately runs past max_position_embeddings.
            if isinstance(max_pos, int) and not model.get("rope_scaling"):
                need(
                    total <= max_pos,
                    "data.max_response_tokens",
                    f"prompt + response = {total} tokens exceeds max_position_embeddings {max_pos}",
                )
    if check_paths:
        if cfg.data.kind in ("math", "code"):
            need(bool(cfg.data.train_path), "data.train_path", f"is required for data.kind={cfg.data.kind!r}")
        for name, value in [("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)]:
            need(not value or Path(value).exists(), name, f"{value} does not exist")
    need(
        cfg.loop.eval_every == 0 or bool(cfg.data.eval_path) or cfg.data.kind == "synthetic",
        "loop.eval_every",
        f"periodic evaluation of data.kind={cfg.data.kind!r} needs held-out prompts in data.eval_path",
    )
    return p


_TIME_LIMIT = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")


def _slurm_problems(cfg: JobConfig) -> list[str]:
    """The disaggregated Slurm job: rollout nodes + trainer nodes, engines spread evenly over the first."""
    c, r, t = cfg.cluster, cfg.rollout, cfg.trainer
    p: list[str] = []

    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            p.append(f"field '{name}': {message}")

    need(
        c.rollout_nodes >= 1,
        "cluster.rollout_nodes",
        "must be >= 1 for the slurm executor (the rollout fleet gets its own nodes)",
    )
    need(
        c.rollout_nodes < c.nodes,
        "cluster.rollout_nodes",
        f"{c.rollout_nodes} leaves no node of cluster.nodes={c.nodes} to the trainer",
    )
    if c.rollout_nodes >= 1:
        need(
            r.engines % c.rollout_nodes == 0,
            "rollout.engines",
            f"{r.engines} engines do not spread evenly over cluster.rollout_nodes={c.rollout_nodes}",
        )
    if c.gpus_per_node:
        # TP groups stay inside a node (NVLink); PP x DP span nodes.
        need(
            c.gpus_per_node % t.tp == 0,
            "trainer.tp",
            f"{t.tp} does not divide cluster.gpus_per_node={c.gpus_per_node}",
        )
        need(
            c.gpus_per_node % r.engine_tp == 0,
            "rollout.engine_tp",
            f"{r.engine_tp} does not divide cluster.gpus_per_node={c.gpus_per_node}",
        )
    else:
        need(
            t.tp * t.pp == 1 and r.engine_tp == 1,
            "trainer.tp",
            "CPU nodes (cluster.gpus_per_node=0) run one trainer process and TP-1 engines",
        )
    need(bool(_TIME_LIMIT.match(c.time_limit)), "cluster.time_limit", f"{c.time_limit!r} is not [D-]HH:MM:SS")
    for i, mount in enumerate(c.container_mounts):
        need(":" in mount, f"cluster.container_mounts[{i}]", f"{mount!r} is not src:dst[:flags]")
    need(
        not c.container_mounts or bool(c.container_image),
        "cluster.container_mounts",
        "mounts need cluster.container_image",
    )
    for name, port in [("cluster.engine_base_port", c.engine_base_port), ("cluster.rdzv_port", c.rdzv_port)]:
        need(1024 <= port <= 65535, name, f"port {port} is outside 1024..65535")
    need(
        c.rollout_start_timeout_s > 0,
        "cluster.rollout_start_timeout_s",
        f"must be > 0, got {c.rollout_start_timeout_s}",
    )
    need(bool(c.job_dir), "cluster.job_dir", "is empty")
    need(bool(c.python), "cluster.python", "is empty")
    return p
