"""What to launch and where: the typed `LaunchSpec` (rollout group + trainer group + cluster), its
validation, `key=value` overrides and loading from a spec file or module."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sparrow_megatron import loader
from sparrow_megatron.errors import UserError
from sparrow_megatron.launch.config import TIME_LIMIT

# The image the Dockerfile builds and documents; recipes that run in containers reference it.
DEFAULT_IMAGE = "ghcr.io/sparrow-megatron/sparrow:0.1.0"

# A command is either given as argv or built from the final (overridden, validated) spec.
Command = list[str] | Callable[["LaunchSpec"], list[str]]


@dataclass
class RolloutGroupConfig:
    """The rollout het group: one SGLang engine per `engine_tp` GPUs on each node, plus the router."""

    nodes: int = 1
    gpus_per_node: int = 8
    engine_tp: int = 1
    router_port: int = 30000
    engine_base_port: int = 30010
    # Engines each node runs; None = one per `engine_tp` GPUs (or one on a CPU node).
    engines_per_node: int | None = None

    @property
    def engines_on_each_node(self) -> int:
        if self.engines_per_node is not None:
            return self.engines_per_node
        return max(self.gpus_per_node // self.engine_tp, 1)


@dataclass
class TrainerGroupConfig:
    """The trainer het group: torchrun over Megatron TP x PP x DP (DP is what is left of the world)."""

    nodes: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    # Processes per node; defaults to one per GPU. CPU runs (gloo) set it with gpus_per_node=0.
    procs_per_node: int | None = None
    rdzv_port: int = 29500
    # "torchrun" wraps trainer_cmd in torchrun; "none" runs it once per node as given.
    launcher: Literal["torchrun", "none"] = "torchrun"

    @property
    def nproc_per_node(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


@dataclass
class SlurmSettings:
    """Where the job runs: Slurm account/partition/limits, optional pyxis container, the job dir."""

    account: str = "sparrow"
    partition: str | None = None
    time_limit: str = "04:00:00"
    # pyxis: both het groups run in this image with these `src:dst[:flags]` mounts; None = plain srun.
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    # NeMo-Run's home: experiments, sbatch scripts and logs live under <job_dir>/experiments/<name>/.
    job_dir: str = "~/.sparrow/jobs"
    env: dict[str, str] = field(default_factory=dict)
    # The interpreter that runs the task wrapper on the nodes (the image's python in containers).
    python: str = "python3"
    # Slurm sends USR1 to the batch shell this many seconds before the time limit: the job requeues
    # itself and the trainer resumes from its last checkpoint.
    requeue_signal_s: int = 300
    # Requeues after a failed exit (NeMo-Run's retry count); preemption requeues regardless.
    max_retries: int = 0
    # Seconds between starting the rollout group and the trainer group (the trainer should also poll
    # the router itself); and NeMo-Run's monitor period for the het group's processes.
    group_start_delay_s: int = 0
    monitor_interval_s: int = 10


@dataclass
class LaunchSpec:
    """One disaggregated RL job: a rollout group and a trainer group that meet through the env."""

    name: str
    rollout_cmd: Command
    trainer_cmd: Command
    rollout: RolloutGroupConfig = field(default_factory=RolloutGroupConfig)
    trainer: TrainerGroupConfig = field(default_factory=TrainerGroupConfig)
    cluster: SlurmSettings = field(default_factory=SlurmSettings)
    run_dir: str = "runs/slurm"
    mlflow_uri: str | None = None
    # The NCCL group between trainer rank 0 and the rollout engines for weight sync.
    weight_sync_port: int = 29600
    # Appended to the trainer command when Slurm restarts the job (requeue after preemption).
    resume_flag: str = "--resume"
    executor: Literal["slurm", "local"] = "slurm"

    def resolved_rollout_cmd(self) -> list[str]:
        return _resolve(self.rollout_cmd, self, "rollout_cmd")

    def resolved_trainer_cmd(self) -> list[str]:
        return _resolve(self.trainer_cmd, self, "trainer_cmd")


def _resolve(cmd: Command, spec: LaunchSpec, name: str) -> list[str]:
    argv = cmd(spec) if callable(cmd) else cmd
    if not isinstance(argv, list | tuple) or not argv or not all(isinstance(a, str) for a in argv):
        raise UserError(
            f"spec '{spec.name}': field '{name}' must be a non-empty list of strings, got {argv!r}"
        )
    return list(argv)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Slurm's signal timer has a 60 s resolution (sbatch --signal), plus the batch script's first seconds.
SIGNAL_SLACK_S = 90


def validate(spec: LaunchSpec) -> LaunchSpec:
    """Every check that can fail before submission, each naming the field; returns the spec."""

    def fail(fieldname: str, message: str) -> None:
        raise UserError(f"spec '{spec.name}': field '{fieldname}': {message}")

    if not _NAME.match(spec.name or ""):
        fail("name", f"{spec.name!r} must be letters, digits, '_', '.', '-' (it names the Slurm job)")
    # A Python spec file's values are not type-checked by the dataclass: the Literal fields are here.
    for section, prefix in [(spec, ""), (spec.rollout, "rollout."), (spec.trainer, "trainer.")]:
        for name, hint in typing.get_type_hints(type(section)).items():
            choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
            if choices and getattr(section, name) not in choices:
                fail(
                    prefix + name, f"{getattr(section, name)!r} is not one of {', '.join(map(repr, choices))}"
                )
    r, t, c = spec.rollout, spec.trainer, spec.cluster
    for fieldname, value in [("rollout.nodes", r.nodes), ("trainer.nodes", t.nodes)]:
        if value < 1:
            fail(fieldname, f"must be >= 1, got {value}")
    for fieldname, value in [
        ("rollout.gpus_per_node", r.gpus_per_node),
        ("trainer.gpus_per_node", t.gpus_per_node),
    ]:
        if value < 0:
            fail(fieldname, f"must be >= 0, got {value}")
    # Slurm needs the GPU request on every het component or on none (NeMo-Run writes None otherwise).
    if (r.gpus_per_node == 0) != (t.gpus_per_node == 0):
        fail("trainer.gpus_per_node", "rollout and trainer must both request GPUs or both request none")
    if r.engine_tp < 1:
        fail("rollout.engine_tp", f"must be >= 1, got {r.engine_tp}")
    if r.gpus_per_node and r.gpus_per_node % r.engine_tp:
        fail("rollout.engine_tp", f"{r.engine_tp} must divide rollout.gpus_per_node={r.gpus_per_node}")
    if t.tp < 1 or t.pp < 1:
        fail("trainer.tp" if t.tp < 1 else "trainer.pp", "must be >= 1")
    if t.nproc_per_node < 1:
        fail("trainer.procs_per_node", f"must be >= 1 (gpus_per_node={t.gpus_per_node})")
    if t.procs_per_node is not None and t.gpus_per_node and t.procs_per_node > t.gpus_per_node:
        fail("trainer.procs_per_node", f"{t.procs_per_node} > trainer.gpus_per_node={t.gpus_per_node}")
    # TP stays inside a node (NVLink); PP x DP span nodes.
    if t.nproc_per_node % t.tp:
        fail("trainer.tp", f"{t.tp} must divide the trainer's GPUs per node ({t.nproc_per_node})")
    if t.world_size % (t.tp * t.pp):
        fail("trainer.pp", f"TP*PP={t.tp * t.pp} must divide the trainer world size {t.world_size}")
    ports = {
        "rollout.router_port": r.router_port,
        "rollout.engine_base_port": r.engine_base_port,
        "trainer.rdzv_port": t.rdzv_port,
        "weight_sync_port": spec.weight_sync_port,
    }
    for fieldname, port in ports.items():
        if not 1024 <= port <= 65535:
            fail(fieldname, f"port {port} is outside 1024..65535")
    if r.engines_per_node is not None and r.engines_per_node < 1:
        fail("rollout.engines_per_node", f"must be >= 1, got {r.engines_per_node}")
    if r.gpus_per_node and r.engines_on_each_node * r.engine_tp > r.gpus_per_node:
        fail(
            "rollout.engines_per_node",
            f"{r.engines_on_each_node} engines x TP {r.engine_tp} exceed rollout.gpus_per_node={r.gpus_per_node}",
        )
    engines = r.engines_on_each_node
    if r.router_port in range(r.engine_base_port, r.engine_base_port + engines):
        fail("rollout.router_port", f"{r.router_port} collides with the engine ports")
    if not c.account:
        fail("cluster.account", "must be set (sbatch --account)")
    if not TIME_LIMIT.match(c.time_limit):
        fail("cluster.time_limit", f"{c.time_limit!r} is not [D-]HH:MM:SS")
    for mount in c.container_mounts:
        if ":" not in mount:
            fail("cluster.container_mounts", f"{mount!r} is not src:dst[:flags]")
    if c.container_mounts and not c.container_image:
        fail("cluster.container_mounts", "mounts need cluster.container_image")
    for key in c.env:
        if not _ENV_KEY.match(key):
            fail("cluster.env", f"{key!r} is not a valid environment variable name")
    if c.requeue_signal_s > 0 and _seconds(c.time_limit) < c.requeue_signal_s + SIGNAL_SLACK_S:
        fail(
            "cluster.requeue_signal_s",
            f"{c.requeue_signal_s}s leaves less than {SIGNAL_SLACK_S}s of time_limit {c.time_limit} before the "
            "signal: Slurm may send USR1 up to 60 s early, and one that comes before the batch script has "
            "set its handler ends the job (FAILED, not requeued); raise time_limit or lower requeue_signal_s",
        )
    if c.requeue_signal_s < 0 or c.max_retries < 0:
        fail("cluster.requeue_signal_s" if c.requeue_signal_s < 0 else "cluster.max_retries", "must be >= 0")
    spec.resolved_rollout_cmd()
    spec.resolved_trainer_cmd()
    return spec


def _seconds(time_limit: str) -> int:
    days, _, clock = time_limit.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def apply_overrides(spec: LaunchSpec, overrides: list[str]) -> LaunchSpec:
    """`trainer.tp=4`, `cluster.env={"A":"1"}`, `cluster.container_mounts=/a:/a,/b:/b`: a new spec."""
    return loader.apply_overrides(
        spec, overrides, settable=lambda name: not name.endswith("_cmd"), copy_root=_deepcopy
    )


def _deepcopy(spec: LaunchSpec) -> LaunchSpec:
    # Commands may be callables (not deep-copyable in general); the sections are plain data.
    return dataclasses.replace(
        spec,
        rollout=dataclasses.replace(spec.rollout),
        trainer=dataclasses.replace(spec.trainer),
        cluster=dataclasses.replace(
            spec.cluster, container_mounts=list(spec.cluster.container_mounts), env=dict(spec.cluster.env)
        ),
    )


def load_spec(source: str) -> LaunchSpec:
    """A `.py` file or a dotted module that defines `SPEC` (a LaunchSpec) or `spec()` returning one."""
    path = Path(source)
    if source.endswith(".py"):
        module = loader.load_python(path, "spec")
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as err:
            raise UserError(f"{source}: no such spec file or module ({err})") from err
    if hasattr(module, "SPEC"):
        spec = module.SPEC
    elif callable(getattr(module, "spec", None)):
        spec = module.spec()
    else:
        raise UserError(f"{source}: defines neither SPEC nor spec()")
    if not isinstance(spec, LaunchSpec):
        raise UserError(f"{source}: SPEC/spec() gave {type(spec).__name__}, not a LaunchSpec")
    return spec
