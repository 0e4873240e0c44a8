"""The job config's `reward` section: how code rewards judge generated programs, how many judges run.

Kept free of the sandbox's imports so the job config loads (and validates) without them; the sandbox
takes its settings through `CodeRewardConfig.from_section`. `isolation` is "bwrap" (isolated; code
rewards refuse to run where the machine cannot give it, naming the missing kernel feature) or "unsafe"
(programs run with rlimits only: a loud warning on the console and the MLflow tag
`reward.isolation=unsafe`). There is no automatic fallback between them.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from sparrow_megatron.validation import Problems

# The one list of isolation modes: the job config, the sandbox and `sparrow reward code` read it here.
Isolation = Literal["bwrap", "unsafe"]
ISOLATION_MODES: tuple[str, ...] = typing.get_args(Isolation)


@dataclass
class RewardConfig:
    isolation: Isolation = "bwrap"  # "unsafe" runs generated code without isolation
    timeout_s: float = 5.0  # wall clock per test case, decided by the supervisor
    memory_mb: int = 1024  # per run (cgroup, when the machine lends one) and per process (RLIMIT_AS)
    max_processes: int = 16  # per run (cgroup pids) and RLIMIT_NPROC
    tmpfs_mb: int = 32  # the program's private /tmp
    max_output_mb: int = 1  # stdout and stderr each; past it the run is killed
    cgroup_parent: str = ""  # a delegated cgroup v2 directory for per-run limits; "" = find one
    # Judges at once: sandboxes for code (cases of all responses), processes for math; 0 = half the cores.
    workers: int = 0
    # Math: wall clock of one response's judgement; past it its process is killed and the response
    # scores 0 (counted as reward/judge_errors/timeout). math-verify's own timeouts cover most hangs.
    judge_timeout_s: float = 30.0
    all_or_nothing: bool = False  # reward 1 only if every case passes (else the fraction passed)
    max_cases: int = 0  # 0 = every case of a problem
    float_tolerance: float = 1e-6  # only where the expected value is a float; integers are exact

    def problems(self, prefix: str = "reward.") -> list[str]:
        """Bounds of the fields; `isolation`'s values are checked from its type when the config loads."""
        p = Problems(prefix)
        p.positive(timeout_s=self.timeout_s, judge_timeout_s=self.judge_timeout_s)
        p.at_least(1, memory_mb=self.memory_mb, max_processes=self.max_processes, tmpfs_mb=self.tmpfs_mb,
                   max_output_mb=self.max_output_mb)  # fmt: skip
        p.at_least(0, workers=self.workers, max_cases=self.max_cases)
        p.need(
            0 <= self.float_tolerance < 1, "float_tolerance", f"must be in [0, 1), got {self.float_tolerance}"
        )
        p.need(
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
