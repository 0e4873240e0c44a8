"""Run untrusted (model-generated) Python programs in a sandbox, many at a time.

Each run: a new session / process group; rlimits on CPU time, address space, process count, file
size and open files; a wall-clock timeout; an empty private work dir; a minimal environment (nothing
from the parent); stdout/stderr capped; no network. How (see sandbox_launcher.py for the details):

- isolation "namespaces" (needs root, the default when available): new mount/net/PID/IPC/UTS
  namespaces, a private tmpfs work dir, an unprivileged uid reserved for the run (root is exempt from
  RLIMIT_NPROC, so without a uid switch a fork bomb is not contained). The network namespace has only
  a down loopback: connect() to 127.0.0.1 or anywhere fails.
- isolation "rlimits" (fallback without root; weaker, documented): rlimits, a temp dir, and an audit
  hook in the child that refuses socket creation, subprocess spawning and ctypes.

After every run, whatever happened, the process group is killed, every process still owned by the
run's uid is killed (orphans that called setsid), and the fallback's temp dir is removed. Written by
hand because no maintained library sandboxes a Python program this way without a container runtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
MODES = ("auto", "namespaces", "rlimits")
MIB = 1 << 20


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a judgment of the program)."""


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 5.0  # wall clock per run; CPU time limit is the same, rounded up
    memory_mb: int = 1024  # RLIMIT_AS
    max_processes: int = 16  # RLIMIT_NPROC for the run's own uid
    max_file_mb: int = 16  # RLIMIT_FSIZE
    max_open_files: int = 64
    tmpfs_mb: int = 32  # size of the private work dir (namespaces mode)
    max_output_bytes: int = 1 * MIB  # stdout and stderr each; past it the run is killed
    nice: int = 10  # leave the machine to the trainer and the servers
    isolation: str = "auto"
    python: str = ""  # interpreter for the program; "" = /usr/bin/python3 when present, else this one
    uid_base: int = 61000  # namespaces mode: uids uid_base .. uid_base+uid_slots-1 are reserved
    uid_slots: int = 64
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.isolation not in MODES:
            raise ValueError(f"isolation must be one of {MODES}, got {self.isolation!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")


@dataclass
class SandboxResult:
    status: str  # "ok" (exit 0), "error" (nonzero exit), "timeout", "killed" (signal or output cap)
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    reason: str = ""


_MODE_LOCK = threading.Lock()
_RESOLVED_MODE: str | None = None


def resolve_isolation(requested: str = "auto") -> str:
    """The isolation that will be used: "namespaces" when running as root and it works, else "rlimits"."""
    global _RESOLVED_MODE
    if requested != "auto":
        return requested
    with _MODE_LOCK:
        if _RESOLVED_MODE is None:
            _RESOLVED_MODE = "rlimits"
            if os.geteuid() == 0:
                probe = run_program("print('ok')", config=SandboxConfig(isolation="namespaces", timeout_s=20))
                if probe.status == "ok" and probe.stdout.strip() == "ok":
                    _RESOLVED_MODE = "namespaces"
    return _RESOLVED_MODE


def _default_python() -> str:
    # The venv interpreter may live under /root (mode 0700), which the sandbox uid cannot open.
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


class _UidSlot:
    """An exclusive uid for one run, locked across processes with flock (released on close/exit)."""

    def __init__(self, config: SandboxConfig):
        lock_dir = Path(tempfile.gettempdir()) / "sparrow-sandbox-uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        for _ in range(200):
            for uid in range(config.uid_base, config.uid_base + config.uid_slots):
                fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self.uid, self._fd = uid, fd
                return
            time.sleep(0.05)
        raise SandboxError(
            f"no free sandbox uid in {config.uid_base}..{config.uid_base + config.uid_slots - 1}"
        )

    def release(self) -> None:
        os.close(self._fd)


def processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) PIDs whose real uid is `uid` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        # Zombies hold nothing and cannot act; their parent (or init) reaps them.
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _kill_uid(uid: int, deadline_s: float = 5.0) -> None:
    # Root may signal anything; the uid is reserved for this run, so nothing else is hit.
    end = time.monotonic() + deadline_s
    while True:
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > end:
            raise SandboxError(f"processes of sandbox uid {uid} survived SIGKILL: {pids}")
        time.sleep(0.02)


def _limits(config: SandboxConfig, mode: str) -> dict[str, int]:
    cpu = math.ceil(config.timeout_s)
    nproc = config.max_processes
    if mode == "rlimits":
        # Without a uid of its own the count includes every process of the current user.
        nproc += len(processes_of_uid(os.getuid()))
    return {
        "RLIMIT_CPU": cpu,
        "RLIMIT_AS": config.memory_mb * MIB,
        "RLIMIT_NPROC": nproc,
        "RLIMIT_FSIZE": config.max_file_mb * MIB,
        "RLIMIT_NOFILE": config.max_open_files,
        "RLIMIT_CORE": 0,
    }


def _env(config: SandboxConfig, home: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home}
    env.update(config.extra_env)
    return env


def run_program(
    source: str,
    stdin: str = "",
    *,
    config: SandboxConfig = SandboxConfig(),
    files: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> SandboxResult:
    """Run `source` as `prog.py` (plus `files` next to it) in the sandbox and collect its outcome.

    `args` replaces the default argv (["prog.py"]): e.g. ["harness.py"] to run a harness that imports
    prog.py. Never raises for anything the program does; raises SandboxError if the sandbox fails.
    """
    mode = resolve_isolation(config.isolation)
    all_files = {"prog.py": source, **(files or {})}
    slot = _UidSlot(config) if mode == "namespaces" else None
    workdir = None if mode == "namespaces" else tempfile.mkdtemp(prefix="sparrow-sandbox-")
    try:
        spec = {
            "mode": mode,
            "python": config.python or _default_python(),
            "argv": args or ["prog.py"],
            "files": all_files,
            "limits": _limits(config, mode),
            "nice": config.nice,
            "env": _env(config, "/tmp" if workdir is None else workdir),
            "tmpfs_mb": config.tmpfs_mb,
            "workdir": workdir,
            "uid": slot.uid if slot else os.getuid(),
            "gid": slot.uid if slot else os.getgid(),
        }
        return _launch(spec, stdin, config)
    finally:
        if slot is not None:
            try:
                _kill_uid(slot.uid)
            finally:
                slot.release()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _launch(spec: dict, stdin: str, config: SandboxConfig) -> SandboxResult:
    status_r, status_w = os.pipe()
    with tempfile.TemporaryFile("w+") as spec_file:
        json.dump(spec, spec_file)
        spec_file.flush()
        spec_file.seek(0)
        spec_fd = spec_file.fileno()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER), str(spec_fd), str(status_w)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(spec_fd, status_w),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                cwd="/",
            )
        finally:
            os.close(status_w)
        try:
            out, err, reason = _communicate(proc, stdin.encode(), config, start)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            with os.fdopen(status_r, "rb") as f:
                setup_error = f.read().decode(errors="replace")
    wall = time.monotonic() - start
    if setup_error:
        raise SandboxError(f"sandbox setup failed ({spec['mode']}): {setup_error}")
    code = proc.returncode
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if reason == "timeout":
        return SandboxResult("timeout", None, stdout, stderr, wall, "wall-clock timeout")
    if reason == "output":
        return SandboxResult("killed", None, stdout, stderr, wall, "output limit exceeded")
    if code == 0:
        return SandboxResult("ok", 0, stdout, stderr, wall)
    if code > 128:
        sig = code - 128
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and wall >= config.timeout_s):
            return SandboxResult("timeout", code, stdout, stderr, wall, "CPU time limit")
        return SandboxResult("killed", code, stdout, stderr, wall, f"killed by {signal.Signals(sig).name}")
    return SandboxResult("error", code, stdout, stderr, wall, f"exit code {code}")


def _communicate(proc: subprocess.Popen, data: bytes, config: SandboxConfig, start: float):
    """Feed stdin, read both streams up to the cap, stop at the deadline. Returns (out, err, reason)."""
    chunks = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in chunks:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    offset, open_readers = 0, 2
    deadline = start + config.timeout_s
    reason = ""
    try:
        while open_readers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                if key.fileobj is proc.stdin:
                    try:
                        offset += os.write(proc.stdin.fileno(), data[offset : offset + 65536])
                    except (BrokenPipeError, OSError):
                        offset = len(data)
                    if offset >= len(data):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                piece = os.read(key.fileobj.fileno(), 65536)
                if not piece:
                    sel.unregister(key.fileobj)
                    open_readers -= 1
                    continue
                buf = chunks[key.fileobj]
                buf += piece
                if len(buf) > config.max_output_bytes:
                    del buf[config.max_output_bytes :]
                    reason = "output"
            if reason:
                break
        if not reason:
            # Streams closed: wait for the exit status within what is left of the deadline.
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                reason = "timeout"
    finally:
        sel.close()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
    return bytes(chunks[proc.stdout]), bytes(chunks[proc.stderr]), reason


class SandboxPool:
    """Bounded parallel runner: at most `workers` sandboxes at once (default: half the cores, >= 1)."""

    def __init__(self, config: SandboxConfig = SandboxConfig(), workers: int | None = None):
        self.config = config
        self.workers = workers or max(1, (os.cpu_count() or 2) // 2)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")

    def submit(self, source: str, stdin: str = "", **kwargs):
        kwargs.setdefault("config", self.config)
        return self._executor.submit(run_program, source, stdin, **kwargs)

    def map(self, jobs: list[dict]) -> list[SandboxResult]:
        """Run jobs (keyword arguments of run_program) in parallel; results in job order."""
        futures = [self.submit(**job) for job in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
