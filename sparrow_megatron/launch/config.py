"""The `cluster` section of the job config: the machines and, for the slurm executor, the job.

`sparrow submit` turns a job config into a LaunchSpec (launch/job.py); the checks that involve other
sections (engines per node, TP against GPUs per node) are the job config's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from sparrow_megatron.validation import Problems

Executor = Literal["local", "slurm"]
TIME_LIMIT = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")


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

    def problems(self, prefix: str = "cluster.") -> list[str]:
        p = Problems(prefix)
        p.at_least(1, nodes=self.nodes)
        p.at_least(0, gpus_per_node=self.gpus_per_node, rollout_nodes=self.rollout_nodes)
        if self.executor != "slurm":
            return p
        p.need(
            self.rollout_nodes >= 1,
            "rollout_nodes",
            "must be >= 1 for the slurm executor (the rollout fleet gets its own nodes)",
        )
        p.need(
            self.rollout_nodes < self.nodes,
            "rollout_nodes",
            f"{self.rollout_nodes} leaves no node of {prefix}nodes={self.nodes} to the trainer",
        )
        p.need(
            bool(TIME_LIMIT.match(self.time_limit)), "time_limit", f"{self.time_limit!r} is not [D-]HH:MM:SS"
        )
        for i, mount in enumerate(self.container_mounts):
            p.need(":" in mount, f"container_mounts[{i}]", f"{mount!r} is not src:dst[:flags]")
        p.need(
            not self.container_mounts or bool(self.container_image),
            "container_mounts",
            f"mounts need {prefix}container_image",
        )
        for name, port in [("engine_base_port", self.engine_base_port), ("rdzv_port", self.rdzv_port)]:
            p.need(1024 <= port <= 65535, name, f"port {port} is outside 1024..65535")
        p.need(
            self.rollout_start_timeout_s > 0,
            "rollout_start_timeout_s",
            f"must be > 0, got {self.rollout_start_timeout_s}",
        )
        p.non_empty(job_dir=self.job_dir, python=self.python)
        return p
