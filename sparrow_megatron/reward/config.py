"""The job config's `reward` section: how code rewards judge generated programs.

Kept free of the sandbox's imports so the job config loads (and validates) without them. `isolation`
is "bwrap" (isolated; code rewards refuse to run where the machine cannot give it, naming the missing
kernel feature) or "unsafe" (programs run with rlimits only: a loud warning on the console and the
MLflow tag `reward.isolation=unsafe`). There is no automatic fallback between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Isolation = Literal["bwrap", "unsafe"]
ISOLATIONS = ("bwrap", "unsafe")


@dataclass
class RewardConfig:
    isolation: Isolation = "bwrap"
    timeout_s: float = 5.0  # wall clock per test case, decided by the supervisor
    memory_mb: int = 1024  # per run (cgroup, when the machine lends one) and per process (RLIMIT_AS)
    max_processes: int = 16  # per run (cgroup pids) and RLIMIT_NPROC
    tmpfs_mb: int = 32  # the program's private /tmp
    max_output_mb: int = 1  # stdout and stderr each; past it the run is killed
    cgroup_parent: str = ""  # a delegated cgroup v2 directory for per-run limits; "" = find one
    workers: int = 0  # sandboxes at once; 0 = half the cores
    all_or_nothing: bool = False  # reward 1 only if every case passes (else the fraction passed)
    max_cases: int = 0  # 0 = every case of a problem
    float_tolerance: float = 1e-6  # only where the expected value is a float; integers are exact

    def problems(self, prefix: str = "reward.") -> list[str]:
        p = []

        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                p.append(f"field '{prefix}{name}': {message}")

        need(self.isolation in ISOLATIONS, "isolation", f"must be one of {', '.join(ISOLATIONS)}, got "
             f"{self.isolation!r} (unsafe runs generated code without isolation)")  # fmt: skip
        need(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "max_processes", "tmpfs_mb", "max_output_mb"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "max_cases"):
            need(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        need(
            0 <= self.float_tolerance < 1, "float_tolerance", f"must be in [0, 1), got {self.float_tolerance}"
        )
        need(
            not self.cgroup_parent or self.cgroup_parent.startswith("/"),
            "cgroup_parent",
            f"must be an absolute path (a cgroup v2 directory), got {self.cgroup_parent!r}",
        )
        return p

    def mlflow_tags(self) -> dict[str, str]:
        """Tags for the run: an unsafe reward is visible in MLflow, not only in the console."""
        tags = {"reward.isolation": self.isolation}
        if self.isolation == "unsafe":
            tags["reward.unsafe_warning"] = "generated code ran WITHOUT isolation"
        return tags

    def code_config(self):
        """The CodeRewardConfig these settings give (imports the sandbox)."""
        from sparrow_megatron.reward.code_reward import CodeRewardConfig
        from sparrow_megatron.reward.sandbox import MIB, SandboxConfig

        sandbox = SandboxConfig(
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            max_processes=self.max_processes,
            tmpfs_mb=self.tmpfs_mb,
            max_output_bytes=self.max_output_mb * MIB,
            isolation=self.isolation,
            cgroup_parent=self.cgroup_parent,
        )
        return CodeRewardConfig(
            all_or_nothing=self.all_or_nothing,
            max_cases=self.max_cases,
            float_tolerance=self.float_tolerance,
            sandbox=sandbox,
        )
