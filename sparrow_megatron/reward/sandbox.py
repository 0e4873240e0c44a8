"""Run untrusted (model-generated) Python programs in a sandbox, many at a time.

The policy being trained is an adversary: whatever a program can reach and turns into reward, the
policy will learn. Isolation "bwrap" (the default) runs each program under bubblewrap:
- a fresh root holding only /usr (and the /bin, /lib... links or directories of the host) and
  /etc/ld.so.cache read-only, a private size-limited /tmp with the program's files, its own /proc and a
  minimal read-only /dev: no repository, run directory, dataset, checkpoint, /home, /root, /run, /work,
  and no host unix socket is reachable;
- new user, mount, PID, network (a down loopback only), IPC, UTS and cgroup namespaces, nested user
  namespaces disabled, all capabilities dropped;
- a seccomp filter (seccomp.py) refusing keyrings, namespaces, ptrace, bpf, perf, io_uring, mounts;
- a fresh session keyring; when running as root, a uid reserved for the run;
- rlimits per process, and per run a memory + pids cgroup where the machine lends one (cgroup.py);
- a wall-clock deadline enforced here, by the supervisor: a program's exit code never says "timeout".
bubblewrap (Debian/Ubuntu package `bubblewrap`) does the namespace and mount work: it is small, kept
by the Flatpak project, and does exactly this job, where the hand-written launcher that preceded it
left the host filesystem visible. If bwrap cannot isolate a program on this machine, code rewards
refuse to run with the missing feature named; isolation "unsafe" (rlimits and an audit hook only, which
one line of Python disables) runs anyway, only when set explicitly, with a loud warning.

After every run, whatever happened, bwrap's process group, the run's cgroup and (as root) every process
of the run's uid are killed; nothing is written on the host outside the unsafe mode's temp dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
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

from sparrow_megatron.errors import UserError
from sparrow_megatron.reward import cgroup, seccomp
from sparrow_megatron.reward.config import ISOLATION_MODES, Isolation

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
MIB = 1 << 20
UNSAFE_WARNING = (
    "WARNING: reward.isolation=unsafe: generated programs run WITHOUT isolation (rlimits and an audit "
    "hook one line of Python disables). They can read every file this user can read, including the "
    "tests' expected outputs, and reach host sockets. Use only for debugging on a throwaway machine."
)


class SandboxError(RuntimeError):
    """The sandbox itself failed (not a judgment of the program)."""


class IsolationUnavailable(SandboxError, UserError):
    """This machine cannot isolate programs; the message names the missing feature and what to do.
    A UserError too: `sparrow train` stops with the message (exit 2), not a traceback."""


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 5.0  # wall clock per run, decided here; RLIMIT_CPU is a backstop past it
    memory_mb: int = 1024  # per run (cgroup) where available, and RLIMIT_AS per process
    max_processes: int = 16  # per run (cgroup pids) and RLIMIT_NPROC
    max_file_mb: int = 16  # RLIMIT_FSIZE (also bounds each memfd)
    max_open_files: int = 64
    tmpfs_mb: int = 32  # size of the private /tmp
    max_output_bytes: int = 1 * MIB  # stdout and stderr each; past it the run is killed
    nice: int = 10  # leave the machine to the trainer and the servers
    isolation: Isolation = "bwrap"
    python: str = ""  # interpreter for the program; "" = /usr/bin/python3 when present, else this one
    bwrap: str = ""  # "" = bwrap on PATH
    cgroup_parent: str = ""  # a delegated cgroup v2 dir for per-run limits; "" = find one (cgroup.py)
    uid_base: int = 61000  # as root: uids uid_base .. uid_base+uid_slots-1 are reserved for runs
    uid_slots: int = 64
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {self.isolation!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")


@dataclass
class SandboxResult:
    status: str  # "ok" (exit 0), "error" (nonzero exit), "timeout" (deadline), "killed" (signal, limit)
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    reason: str = ""


def signal_name(number: int) -> str:
    """SIGSEGV, SIGRTMIN+6, or 'signal 99': never raises, whatever number a program produced."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"signal {number}"


def _default_python() -> str:
    # The venv interpreter may live under /root or the repository, which the sandbox does not show.
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def _bwrap_path(config: SandboxConfig) -> str | None:
    if config.bwrap:
        return config.bwrap if os.access(config.bwrap, os.X_OK) else None
    return shutil.which("bwrap") or next(
        (p for p in ("/usr/bin/bwrap", "/usr/local/bin/bwrap") if os.access(p, os.X_OK)), None
    )


# ---------------------------------------------------------------- isolation checks (no silent fallback)

_CHECK_LOCK = threading.Lock()
_VERIFIED: set[tuple[str, str]] = set()
_WARNED_UNSAFE = [False]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def missing_features(config: SandboxConfig = SandboxConfig()) -> list[str]:
    """What this machine lacks for isolation "bwrap", each naming the feature (empty: nothing known)."""
    missing = []
    if _bwrap_path(config) is None:
        missing.append("bubblewrap: no `bwrap` executable (Debian/Ubuntu: apt-get install bubblewrap)")
    try:
        seccomp.filter_program()
    except seccomp.SeccompUnavailable as err:
        missing.append(f"seccomp: {err}")
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        missing.append("user namespaces: user.max_user_namespaces is 0")
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        missing.append("unprivileged user namespaces: kernel.unprivileged_userns_clone is 0")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        missing.append(
            "unprivileged user namespaces: kernel.apparmor_restrict_unprivileged_userns is 1 "
            "(AppArmor confines them unless bwrap has a profile allowing `userns`)"
        )
    return missing


def ensure_isolation(config: SandboxConfig) -> None:
    """Return if `config.isolation` can be given here; raise IsolationUnavailable naming what is missing.

    "unsafe" always returns, after a loud warning (once per process). A successful probe is remembered;
    a failed one is not, and never turns into a weaker mode."""
    if config.isolation == "unsafe":
        if not _WARNED_UNSAFE[0]:
            _WARNED_UNSAFE[0] = True
            print(UNSAFE_WARNING, file=sys.stderr, flush=True)
        return
    key = (config.python or _default_python(), _bwrap_path(config) or "")
    with _CHECK_LOCK:
        if key in _VERIFIED:
            return
        missing = missing_features(config)
        if missing:
            raise IsolationUnavailable(_refusal(missing))
        try:
            probe = _run(
                "print('ok')", "", SandboxConfig(**{**config.__dict__, "timeout_s": 30.0}), None, None
            )
        except SandboxError as err:
            raise IsolationUnavailable(_refusal([_diagnose(str(err))])) from err
        if probe.status != "ok" or probe.stdout.strip() != "ok":
            detail = f"{probe.status} {probe.reason} {probe.stderr[-500:]}".strip()
            raise IsolationUnavailable(_refusal([f"a trivial program failed in the sandbox: {detail}"]))
        _VERIFIED.add(key)


def _diagnose(error: str) -> str:
    """Name the kernel feature behind a bwrap setup failure (its own messages say which step failed)."""
    lowered = error.lower()
    if "namespace" in lowered or "uid map" in lowered or "setting up uid" in lowered:
        feature = (
            "user namespaces: bwrap cannot create them here (user.max_user_namespaces, AppArmor's "
            "apparmor_restrict_unprivileged_userns, or a container runtime's seccomp profile forbids them)"
        )
    elif "seccomp" in lowered:
        feature = "seccomp: the kernel refused the filter (CONFIG_SECCOMP_FILTER)"
    elif "mount" in lowered or "tmpfs" in lowered or "proc" in lowered:
        feature = "mount namespaces: bwrap could not build the sandbox's root (mount/proc/tmpfs)"
    else:
        feature = "bwrap could not set up a sandbox"
    return f"{feature}; bwrap said: {error[-1000:]}"


def isolation_available(config: SandboxConfig = SandboxConfig()) -> bool:
    try:
        ensure_isolation(config)
    except IsolationUnavailable:
        return False
    return True


def _refusal(missing: list[str]) -> str:
    return (
        "code rewards refuse to run without isolation. Missing: "
        + "; ".join(missing)
        + ". Run `sparrow reward code --check` on the node; set reward.isolation=unsafe only to run "
        "generated code unisolated on purpose."
    )


# ---------------------------------------------------------------- runs


_next_slot = os.getpid()  # processes sharing the range start at different slots


class _UidSlot:
    """An exclusive uid for one run, locked across processes with flock (released on close/exit)."""

    def __init__(self, config: SandboxConfig):
        lock_dir = Path(tempfile.gettempdir()) / "sparrow-sandbox-uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        # Start after the slot this process took last: a uid is reused only after the others, so the
        # tasks of its previous run have long been reaped.
        global _next_slot
        start, _next_slot = _next_slot, _next_slot + 1
        slots = [config.uid_base + (start + i) % config.uid_slots for i in range(config.uid_slots)]
        for _ in range(200):
            for uid in slots:
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


def processes_of_uid(uid: int, zombies: bool = False) -> list[int]:
    """PIDs whose real uid is `uid` (from /proc); zombies only when asked."""
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
        if int(fields["Uid"].split()[0]) == uid and (zombies or not fields["State"].strip().startswith("Z")):
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


def _limits(config: SandboxConfig, own_uid: bool, uid: int | None = None) -> dict[str, int]:
    nproc = config.max_processes + 2  # bwrap and its reaper
    if not own_uid:
        # Without a uid of its own the count includes every process of the current user.
        nproc += len(processes_of_uid(os.getuid()))
    elif uid is not None:
        # Zombies of the uid's earlier runs (killed, not yet reaped by init: bwrap's pid-1 child is
        # reparented there) still count against RLIMIT_NPROC though they hold nothing.
        nproc += len(processes_of_uid(uid, zombies=True))
    return {
        # One second past the deadline: the supervisor's clock decides timeouts, this is a backstop.
        "RLIMIT_CPU": math.ceil(config.timeout_s) + 1,
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


_CGROUPS: dict[str, cgroup.CgroupSupport] = {}
_CGROUP_LOCK = threading.Lock()


def cgroup_support(config: SandboxConfig) -> cgroup.CgroupSupport:
    with _CGROUP_LOCK:
        if config.cgroup_parent not in _CGROUPS:
            _CGROUPS[config.cgroup_parent] = cgroup.detect(config.cgroup_parent)
        return _CGROUPS[config.cgroup_parent]


def run_program(
    source: str,
    stdin: str = "",
    *,
    config: SandboxConfig = SandboxConfig(),
    files: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> SandboxResult:
    """Run `source` as `prog.py` (plus `files` next to it, in the program's /tmp) and collect its outcome.

    `args` replaces the default argv (["prog.py"]): e.g. ["harness.py"] to run a harness that imports
    prog.py. Never raises for anything the program does; raises IsolationUnavailable if the machine
    cannot isolate it (see ensure_isolation) and SandboxError if the sandbox breaks.
    """
    ensure_isolation(config)
    return _run(source, stdin, config, files, args)


def _run(source, stdin, config, files, args) -> SandboxResult:
    all_files = {"prog.py": source, **(files or {})}
    program_argv = args or ["prog.py"]
    python = config.python or _default_python()
    if config.isolation == "unsafe":
        workdir = tempfile.mkdtemp(prefix="sparrow-sandbox-")
        try:
            spec = {
                "mode": "unsafe", "python": python, "program_argv": program_argv, "files": all_files,
                "limits": _limits(config, own_uid=False), "nice": config.nice,
                "env": _env(config, workdir), "workdir": workdir,
            }  # fmt: skip
            return _launch(spec, stdin, config, [], None)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    as_root = os.geteuid() == 0
    support = cgroup_support(config)
    with contextlib.ExitStack() as stack:
        if as_root:
            slot = _UidSlot(config)
            stack.callback(slot.release)
            stack.callback(_kill_uid, slot.uid)  # runs before release (LIFO)
        group = None
        if support.available:
            try:
                group = cgroup.RunCgroup(support, config.memory_mb * MIB, config.max_processes + 2)
            except OSError as err:
                raise SandboxError(f"cannot make the run's cgroup ({support.reason}): {err}") from err
            stack.callback(group.remove)
        fds = [(_unlinked_file(stack, text.encode()), name) for name, text in all_files.items()]
        filter_fd = _unlinked_file(stack, seccomp.filter_program())
        spec = {
            "mode": "bwrap",
            "bwrap": _bwrap_path(config),
            "argv": None,  # filled by _launch, once the status fd is known
            "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            "limits": _limits(config, own_uid=as_root, uid=slot.uid if as_root else None),
            "nice": config.nice,
            "switch_uid": as_root,
            "uid": slot.uid if as_root else os.getuid(),
            "gid": slot.uid if as_root else os.getgid(),
            "cgroup_procs": group.procs_files if group else [],
        }
        builder = _BwrapArgs(config, python, program_argv, fds, filter_fd)
        return _launch(spec, stdin, config, [fd for fd, _ in fds] + [filter_fd], builder, group)


def _unlinked_file(stack: contextlib.ExitStack, data: bytes) -> int:
    """An fd of a temp file holding `data`, unlinked at once (nothing on the host disk by name);
    bwrap copies it into the sandbox (--file) or reads it (--seccomp)."""
    handle = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - closed by the stack
    handle.write(data)
    handle.flush()
    handle.seek(0)
    return handle.fileno()


@dataclass
class _BwrapArgs:
    config: SandboxConfig
    python: str
    program_argv: list[str]
    file_fds: list[tuple[int, str]]
    seccomp_fd: int

    def build(self, bwrap: str, status_fd: int) -> list[str]:
        c = self.config
        argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]  # fmt: skip
        argv += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        real = os.path.realpath(self.python)
        if not real.startswith(("/usr/", "/bin/", "/lib")):
            # An interpreter outside /usr (a conda or pyenv prefix): its prefix, read-only.
            prefix = str(Path(real).parent.parent)
            argv += ["--ro-bind", prefix, prefix]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--size", str(MIB), "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
        argv += ["--size", str(c.tmpfs_mb * MIB), "--perms", "0700", "--tmpfs", "/tmp"]
        for fd, name in self.file_fds:
            argv += ["--perms", "0600", "--file", str(fd), f"/tmp/{name}"]
        argv += ["--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
        for key, value in _env(c, "/tmp").items():
            argv += ["--setenv", key, value]
        argv += ["--json-status-fd", str(status_fd), "--seccomp", str(self.seccomp_fd)]
        return [*argv, "--", self.python, "-I", *self.program_argv]


_CHILD_PID = re.compile(r'"child-pid"\s*:\s*(\d+)')


def _reap_namespace(status: str, deadline_s: float = 5.0) -> None:
    """Kill the PID namespace's init (bwrap's `child-pid`, a pid of this namespace) and wait until it
    is gone: the kernel then kills every process of the run. Killing bwrap alone leaves that init
    to die by its parent-death signal, a moment later; a fork bomb's teardown can outlast the call.
    The pid is only signalled while it still runs as this run's init, just after bwrap exited, so a
    reused pid is not a concern in practice; as root the run's uid is swept afterwards too."""
    match = _CHILD_PID.search(status)
    if not match:
        return
    pid = int(match.group(1))
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _launch(spec, stdin, config, extra_fds, builder, group=None) -> SandboxResult:
    status_r, status_w = os.pipe()
    if builder is not None:
        spec["argv"] = builder.build(spec["bwrap"], status_w)
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
                pass_fds=(spec_fd, status_w, *extra_fds),
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
            status = _read_nonblocking(status_r)
            _reap_namespace(status)
    wall = time.monotonic() - start
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if status.startswith("launcher:"):
        raise SandboxError(f"sandbox setup failed ({spec['mode']}): {status[:2000]}")
    if spec["mode"] == "bwrap" and not _CHILD_PID.search(status):
        raise SandboxError(f"bwrap did not start the program: {stderr[-2000:].strip() or reason}")
    if reason == "timeout":
        return SandboxResult("timeout", None, stdout, stderr, wall, "wall-clock timeout")
    if reason == "output":
        return SandboxResult("killed", None, stdout, stderr, wall, "output limit exceeded")
    code = proc.returncode
    if group is not None and group.oom_killed():
        return SandboxResult("killed", code, stdout, stderr, wall, "memory limit of the run (cgroup)")
    if code == 0:
        return SandboxResult("ok", 0, stdout, stderr, wall)
    if 128 < code <= 128 + signal.SIGRTMAX:
        # bwrap and the unsafe launcher report a signal N as 128+N, like a shell; a program may also
        # exit with such a code itself. Either way it is a failed run, never a timeout.
        why = f"killed by {signal_name(code - 128)} (exit status {code})"
        return SandboxResult("killed", code, stdout, stderr, wall, why)
    return SandboxResult("error", code, stdout, stderr, wall, f"exit code {code}")


def _read_nonblocking(fd: int) -> str:
    # The write end lives only in bwrap (closed in the program), so this cannot be held open by it;
    # reading without blocking makes sure of it anyway.
    os.set_blocking(fd, False)
    data = bytearray()
    try:
        while len(data) < 65536:
            try:
                piece = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not piece:
                break
            data += piece
    finally:
        os.close(fd)
    return data.decode(errors="replace")


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
