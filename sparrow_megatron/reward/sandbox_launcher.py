"""Sandbox launcher: trusted code that prepares a run's process, then execs bubblewrap (or, only in the
explicit `unsafe` mode, the program itself).

Run as `python -I -S sandbox_launcher.py SPEC_FD STATUS_FD` by `sandbox.py` (stdlib only, imports nothing
from the project, so `-I -S` keeps the venv and the parent's environment out). The spec is JSON read
from the inherited file descriptor SPEC_FD (an unlinked temp file: nothing left on disk). A setup
failure is reported on STATUS_FD as one `launcher: ...` line, never on the program's own streams.

Mode "bwrap", in this order (each step needs the privileges the next one drops):
1. join the run's cgroups (memory and pids limits for everything the run starts);
2. rlimits (per process: CPU, address space, file size, open files, processes), nice;
3. when root: drop to the uid reserved for this run (root is exempt from RLIMIT_NPROC, and a uid of
   its own keeps the run away from every other process);
4. a fresh, empty session keyring, so nothing the parent holds is reachable (the seccomp filter also
   refuses the keyring syscalls; this keeps the state separate even if one of them is allowed later);
5. exec bwrap, which makes the namespaces and the minimal root and loads the seccomp filter.
STATUS_FD stays open into bwrap as its --json-status-fd; bwrap closes it in the program.

Mode "unsafe": rlimits, a fresh temp dir made by the parent, and an audit hook that refuses sockets,
subprocesses and ctypes. One line of Python disables the hook: this is no isolation, only a guard
against honest mistakes, and sandbox.py warns loudly whenever it is used.
"""

import ctypes
import json
import os
import platform
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
KEYCTL_JOIN_SESSION_KEYRING = 1
# keyctl has no libc wrapper without libkeyutils; its number per architecture (asm/unistd.h).
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "ppc64le": 271}

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
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _join_cgroups(procs_files: list) -> None:
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def _fresh_session_keyring() -> None:
    nr = SYS_KEYCTL.get(platform.machine())
    if nr is None:
        raise OSError(f"keyctl syscall number unknown on {platform.machine()}")
    # A NULL name makes a new anonymous keyring and installs it as this process's session keyring.
    _check(_libc.syscall(nr, KEYCTL_JOIN_SESSION_KEYRING, None), "keyctl")


def _bwrap(spec: dict) -> None:
    _join_cgroups(spec["cgroup_procs"])
    os.nice(spec["nice"])
    _set_limits(spec["limits"])
    if spec["switch_uid"]:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    _fresh_session_keyring()
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.set_inheritable(spec["status_fd"], True)
    os.execve(spec["bwrap"], spec["argv"], spec["env"])


def _unsafe(spec: dict) -> int:
    workdir = spec["workdir"]
    for name, text in spec["files"].items():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
    pid = os.fork()
    if pid == 0:
        try:
            os.nice(spec["nice"])
            _set_limits(spec["limits"])
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            os.chdir(workdir)
            argv = [spec["python"], "-I", "-c", AUDIT_BOOTSTRAP, *spec["program_argv"]]
            os.execve(spec["python"], argv, spec["env"])
        except BaseException as err:  # noqa: BLE001 - report any setup failure and never return
            _fail(spec, err)
    _, status = os.waitpid(pid, 0)
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _fail(spec: dict, err: BaseException) -> None:
    os.write(spec["status_fd"], f"launcher: {type(err).__name__}: {err}\n".encode()[:4000])
    os._exit(126)


def main() -> int:
    with os.fdopen(int(sys.argv[1]), "r") as f:
        spec = json.load(f)
    spec["status_fd"] = int(sys.argv[2])
    os.set_inheritable(spec["status_fd"], False)
    try:
        if spec["mode"] == "bwrap":
            _bwrap(spec)
        elif spec["mode"] == "unsafe":
            return _unsafe(spec)
        raise ValueError(f"unknown mode {spec['mode']!r}")
    except BaseException as err:  # noqa: BLE001
        _fail(spec, err)
    return 126


if __name__ == "__main__":
    sys.exit(main())
