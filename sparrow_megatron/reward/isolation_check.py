"""What isolation this machine gives sandboxed programs: `sparrow reward code --check`.

Each item says what was found and, when something is missing, what to do on the node. The verdict
is the one code rewards act on: "bwrap" (they run) or "none" (they refuse unless reward.isolation is
explicitly "unsafe").
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass

from sparrow_megatron.reward import sandbox, seccomp


@dataclass
class CheckItem:
    name: str
    ok: bool
    detail: str


@dataclass
class IsolationReport:
    isolation: str  # "bwrap" or "none"
    items: list[CheckItem]
    refusal: str = ""  # the message code rewards refuse with, when isolation is "none"

    def to_dict(self) -> dict:
        return {
            "isolation": self.isolation,
            "refusal": self.refusal,
            "items": [asdict(i) for i in self.items],
        }


def _bwrap_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot run: {err}"
    return out.stdout.strip() or out.stderr.strip()


def check_isolation(config: sandbox.SandboxConfig | None = None) -> IsolationReport:
    config = sandbox.SandboxConfig(**{**(config or sandbox.SandboxConfig()).__dict__, "isolation": "bwrap"})
    items = []
    bwrap = sandbox._bwrap_path(config)
    items.append(
        CheckItem("bubblewrap", bwrap is not None, f"{bwrap} ({_bwrap_version(bwrap)})" if bwrap else
                  "no bwrap executable: apt-get install bubblewrap (Debian/Ubuntu)")
    )  # fmt: skip
    try:
        n = len(seccomp.filter_program()) // 8
        items.append(CheckItem("seccomp filter", True, f"libseccomp, {n} BPF instructions"))
    except seccomp.SeccompUnavailable as err:
        items.append(CheckItem("seccomp filter", False, str(err)))
    refusal = ""
    try:
        sandbox.ensure_isolation(config)
        items.append(CheckItem("sandbox probe", True, "a program ran under bwrap (namespaces, minimal root)"))
    except sandbox.IsolationUnavailable as err:
        refusal = str(err)
        items.append(CheckItem("sandbox probe", False, refusal))
    if os.geteuid() == 0:
        last = config.uid_base + config.uid_slots - 1
        items.append(
            CheckItem("uid per run", True, f"root: each run gets a reserved uid in {config.uid_base}..{last}")
        )
    else:
        items.append(
            CheckItem("uid per run", True, f"not root: runs use uid {os.getuid()} inside their own user "
                      "namespace; RLIMIT_NPROC counts this user's processes too")
        )  # fmt: skip
    groups = sandbox.cgroup_support(config)
    if groups.available:
        items.append(CheckItem("per-run limits", True, f"memory and pids cgroup {groups.reason}"))
    else:
        items.append(
            CheckItem("per-run limits", False, f"per process only (RLIMIT_AS, RLIMIT_NPROC): {groups.reason}. "
                      "A run may then hold up to max_processes x memory_mb; set sandbox.cgroup_parent to a "
                      "delegated cgroup v2 directory to bound it")
        )  # fmt: skip
    return IsolationReport("none" if refusal else "bwrap", items, refusal)
