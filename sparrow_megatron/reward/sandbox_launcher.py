"""Sandbox launcher: trusted code that isolates itself, then execs the untrusted program.

Run as `python -I -S sandbox_launcher.py SPEC_FD STATUS_FD` by `sandbox.py` (stdlib only, imports nothing from
the project, so `-I -S` keeps the venv and the parent's environment out). The spec is JSON read from
the inherited file descriptor SPEC_FD (an unlinked temp file: no size limit, nothing left on disk).
A setup failure is reported on STATUS_FD (a pipe, closed on exec), never on the program's own streams,
so a program cannot fake one.

Isolation modes (see sandbox.py for how one is picked):
- "namespaces" (root): new mount, network, PID, IPC and UTS namespaces; private tmpfs on /tmp (the
  empty work dir), /var/tmp and /dev/shm (read-only for the program); every other mount remounted
  read-only in the namespace (closes world-writable places like /run/lock); a fresh /proc that shows only the
  sandbox's own processes; the program runs as an unprivileged uid reserved for this run, with
  no_new_privs, so RLIMIT_NPROC is enforced (it is not for root) and it cannot signal host processes.
  When the program (PID 1 of its namespace) exits or is killed, the kernel kills every process left in
  the namespace, and the tmpfs vanishes with the mount namespace.
- "rlimits" (fallback without privileges): only rlimits, a fresh temp dir made by the parent, and an
  audit hook in the child that refuses socket creation, subprocess spawning and ctypes. Weaker: a
  program can still reach the network through an already-imported C extension.
"""

import contextlib
import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# Installed in the child in "rlimits" mode (no namespaces): refuses the events that reach the outside.
AUDIT_BOOTSTRAP = r"""
import sys
_BLOCKED = ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
            "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "ctypes.dlopen", "ctypes.dlsym", "pty.spawn")
def _hook(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
sys.addaudithook(_hook)
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        res = getattr(resource, name)
        resource.setrlimit(res, (value, value))


def _write_files(workdir: str, files: dict, uid: int, gid: int) -> None:
    for name, text in files.items():
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chown(path, uid, gid)


def _exec_program(spec: dict, workdir: str) -> None:
    argv = [spec["python"], "-I"]
    if spec["mode"] == "rlimits":
        argv += ["-c", AUDIT_BOOTSTRAP]
    argv += spec["argv"]
    os.chdir(workdir)
    os.execve(spec["python"], argv, spec["env"])


def _namespaces(spec: dict) -> int:
    uid, gid = spec["uid"], spec["gid"]
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    _read_only_mounts()
    tmp_opts = f"size={spec['tmpfs_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={gid}"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    for path in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16k,nr_inodes=8,mode=0755")
    _write_files("/tmp", spec["files"], uid, gid)
    pid = os.fork()
    if pid == 0:  # PID 1 of the new PID namespace: a minimal init that relays the program's status
        try:
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            # If this fails the host /proc stays visible; other uids' processes are still not signalable.
            with contextlib.suppress(OSError):
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            program = os.fork()
            if program == 0:
                _drop_privileges_and_exec(spec, uid, gid)
            # When this init exits the kernel kills every process left in the namespace.
            os._exit(_wait(program))
        except BaseException as err:  # noqa: BLE001 - report any setup failure and never return
            _fail(spec, err)
    return _wait(pid)


def _drop_privileges_and_exec(spec: dict, uid: int, gid: int) -> None:
    # The program runs as PID 2 (normal signal semantics), never as init.
    try:
        os.nice(spec["nice"])
        _set_limits(spec["limits"])
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _exec_program(spec, "/tmp")
    except BaseException as err:  # noqa: BLE001
        _fail(spec, err)


def _read_only_mounts() -> None:
    """Make every mount of this namespace read-only (bind remount: the host's mounts are untouched),
    so world-writable places such as /run/lock are closed too. /proc, /sys and /dev are left alone:
    writing there needs root or a device node."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        point = point.encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        if point.startswith(("/proc", "/sys", "/dev")):
            continue
        try:
            _mount("none", point, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        except OSError:
            if point == "/":
                raise  # without a read-only root the sandbox is not what it claims


def _fail(spec: dict, err: BaseException) -> None:
    os.write(spec["status_fd"], f"{type(err).__name__}: {err}".encode()[:4000])
    os._exit(126)


def _rlimits(spec: dict) -> int:
    workdir = spec["workdir"]
    _write_files(workdir, spec["files"], os.getuid(), os.getgid())
    pid = os.fork()
    if pid == 0:
        try:
            os.nice(spec["nice"])
            _set_limits(spec["limits"])
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            _exec_program(spec, workdir)
        except BaseException as err:  # noqa: BLE001
            _fail(spec, err)
    return _wait(pid)


def _wait(pid: int) -> int:
    # The launcher is killed with its process group on timeout; until then it relays the status.
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main() -> int:
    with os.fdopen(int(sys.argv[1]), "r") as f:
        spec = json.load(f)
    spec["status_fd"] = int(sys.argv[2])
    os.set_inheritable(spec["status_fd"], False)  # the program never sees it
    try:
        if spec["mode"] == "namespaces":
            return _namespaces(spec)
        if spec["mode"] == "rlimits":
            return _rlimits(spec)
        raise ValueError(f"unknown mode {spec['mode']!r}")
    except BaseException as err:  # noqa: BLE001
        _fail(spec, err)
    return 126


if __name__ == "__main__":
    sys.exit(main())
