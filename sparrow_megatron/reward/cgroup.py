"""Per-run memory and process limits for sandboxed programs, from a cgroup when the machine lends one.

RLIMIT_AS bounds one process; a program that forks, fills memfds or a tmpfs holds much more. A memory
cgroup charges all of it (anonymous memory, page cache, shmem/memfd, tmpfs pages, kernel memory in v2)
to the run, and a pids cgroup counts every task. Both versions are supported:
- cgroup v2: a directory whose `cgroup.subtree_control` enables `memory` and `pids` and that this
  process may write (root, or a delegated subtree such as a Slurm job's or systemd's `Delegate=yes`).
  Found from `sandbox.cgroup_parent`, else this process's cgroup, else its parent (a sibling of the
  leaf a Slurm task runs in: still inside the job's own limits).
- cgroup v1 (hybrid hosts): this process's cgroups in the `memory` and `pids` hierarchies, when
  writable (root).
Without either, limits stay per process and `sparrow reward code --check` says so.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "sparrow-sbx-"


@dataclass(frozen=True)
class CgroupSupport:
    version: str  # "v2", "v1" or "" (none)
    parents: dict[str, str] = field(default_factory=dict)  # controller -> directory runs are made in
    reason: str = ""  # why there is none, or where they are made

    @property
    def available(self) -> bool:
        return bool(self.version)


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, super options) of every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].encode().decode("unicode_escape")
            fstype, _source, opts = (right.split() + ["", "", ""])[:3]
            out.append((point, fstype, opts.split(",")))
    return out


def _own_paths() -> dict[str, str]:
    """Controller ("" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


def _writable_with(directory: Path, controllers: tuple[str, ...]) -> bool:
    try:
        enabled = (directory / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False
    return all(c in enabled for c in controllers) and os.access(directory, os.W_OK | os.X_OK)


def detect(parent: str = "") -> CgroupSupport:
    """Where per-run cgroups can be made on this machine (never raises)."""
    try:
        mounts, own = _mounts(), _own_paths()
    except (OSError, ValueError) as err:
        return CgroupSupport("", reason=f"cannot read /proc/self/cgroup or mountinfo: {err}")
    v2 = next((p for p, t, _ in mounts if t == "cgroup2"), None)
    if parent:
        if _writable_with(Path(parent), ("memory", "pids")):
            return CgroupSupport("v2", {"": parent}, f"v2 under {parent} (sandbox.cgroup_parent)")
        return CgroupSupport(
            "",
            reason=f"sandbox.cgroup_parent {parent}: not a writable cgroup v2 "
            "directory with memory and pids in cgroup.subtree_control",
        )
    if v2 is not None and "" in own:
        here = Path(v2 + own[""])
        for candidate in (here, here.parent):
            if _writable_with(candidate, ("memory", "pids")):
                return CgroupSupport("v2", {"": str(candidate)}, f"v2 under {candidate}")
    v1 = {}
    for controller in ("memory", "pids"):
        point = next((p for p, t, o in mounts if t == "cgroup" and controller in o), None)
        if point is None or controller not in own:
            break
        directory = Path(point + own[controller])
        if not os.access(directory, os.W_OK | os.X_OK):
            break
        v1[controller] = str(directory)
    if len(v1) == 2:
        return CgroupSupport("v1", v1, f"v1 under {v1['memory']} and {v1['pids']}")
    why = "no writable cgroup v2 directory with memory and pids delegated"
    if v2 is None:
        why = "no cgroup v2 mount"
    return CgroupSupport("", reason=why + ", and no writable cgroup v1 memory+pids hierarchy")


class RunCgroup:
    """The cgroup(s) of one run: made with its limits, joined by the launcher, killed and removed after."""

    def __init__(self, support: CgroupSupport, memory_bytes: int, pids: int):
        self.support = support
        self.dirs: list[Path] = []
        name = PREFIX + uuid.uuid4().hex[:12]
        try:
            if support.version == "v2":
                d = Path(support.parents[""]) / name
                d.mkdir()
                self.dirs.append(d)
                (d / "memory.max").write_text(str(memory_bytes))
                with contextlib.suppress(OSError):  # no swap accounting: nothing to bound
                    (d / "memory.swap.max").write_text("0")
                (d / "pids.max").write_text(str(pids))
            else:
                mem = Path(support.parents["memory"]) / name
                mem.mkdir()
                self.dirs.append(mem)
                (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
                with contextlib.suppress(OSError):
                    (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                pid_dir = Path(support.parents["pids"]) / name
                pid_dir.mkdir()
                self.dirs.append(pid_dir)
                (pid_dir / "pids.max").write_text(str(pids))
        except OSError:
            self.remove()
            raise

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this run for the memory limit."""
        name = "memory.events" if self.support.version == "v2" else "memory.oom_control"
        try:
            text = (self.dirs[0] / name).read_text()
        except (OSError, IndexError):
            return False
        counts = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2)
        return counts.get("oom_kill", "0") != "0"

    def remove(self, deadline_s: float = 5.0) -> None:
        """Kill whatever is left in the run's cgroups and remove them."""
        end = time.monotonic() + deadline_s
        for d in self.dirs:
            with contextlib.suppress(OSError):
                (d / "cgroup.kill").write_text("1")  # v2, kernel >= 5.14: kills the whole subtree
            while True:
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, 9)
                try:
                    d.rmdir()
                    break
                except OSError:
                    if time.monotonic() > end:
                        break
                    time.sleep(0.02)
        self.dirs = [d for d in self.dirs if d.exists()]
