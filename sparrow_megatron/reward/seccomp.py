"""The seccomp filter of sandboxed programs, compiled by libseccomp and handed to bwrap (`--seccomp FD`).

A judged program reads stdin, computes and prints; it never needs the kernel's shared or privileged
interfaces. The filter refuses them with EPERM (a clean OSError in Python, not a kill), so nothing a
program does there can outlive its run or reach another sample: keyrings, nested namespaces (clone /
unshare / setns with a CLONE_NEW* flag), ptrace and cross-process memory access, bpf, perf events,
io_uring (its own syscall surface, a frequent source of kernel bugs), mounts and the new mount API,
modules, kexec, userfaultfd. clone3 gets ENOSYS so that the C library falls back to clone, whose flags
the filter can inspect (clone3 passes them in memory, out of a filter's reach).

libseccomp (the C library every systemd machine carries, `libseccomp2` on Debian/Ubuntu) is called
through ctypes: it resolves syscall numbers per architecture and writes the architecture checks (a
32-bit or x32 syscall from a 64-bit process is killed), which a hand-written BPF program would have to
get right by itself. The program is compiled once per process and cached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
import threading

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
# CLONE_NEWTIME (0x80) is absent: clone() reads that byte as the exit signal; only unshare/clone3 take it.
CLONE_NS_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
REFUSED = (
    "keyctl", "add_key", "request_key",
    "unshare", "setns",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "name_to_handle_at", "open_by_handle_at", "fanotify_init",
    "syslog", "acct", "swapon", "swapoff", "reboot", "quotactl", "iopl", "ioperm",
)  # fmt: skip


class SeccompUnavailable(RuntimeError):
    pass


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


_LOCK = threading.Lock()
_CACHE: bytes | None = None


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as err:
        raise SeccompUnavailable(f"libseccomp not found ({err}); install libseccomp2") from err
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def filter_program() -> bytes:
    """The compiled BPF program (struct sock_filter[]), as bwrap's --seccomp reads it."""
    global _CACHE
    with _LOCK:
        if _CACHE is None:
            _CACHE = _compile()
        return _CACHE


def _compile() -> bytes:
    lib = _library()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:

        def rule(name: str, action: int, cmp: _ArgCmp | None = None) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a syscall on this architecture (e.g. iopl on arm64)
                return
            ret = lib.seccomp_rule_add_array(
                ctx, action, nr, 1 if cmp else 0, ctypes.byref(cmp) if cmp else None
            )
            if ret < 0:
                raise SeccompUnavailable(f"seccomp rule for {name}: {os.strerror(-ret)}")

        for name in REFUSED:
            rule(name, _errno_action(errno.EPERM))
        for flag in CLONE_NS_FLAGS.values():
            rule("clone", _errno_action(errno.EPERM), _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        rule("clone3", _errno_action(errno.ENOSYS))
        with tempfile.TemporaryFile() as out:
            ret = lib.seccomp_export_bpf(ctx, out.fileno())
            if ret < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf: {os.strerror(-ret)}")
            out.seek(0)
            program = out.read()
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % 8:
        raise SeccompUnavailable(f"libseccomp wrote a {len(program)}-byte filter")
    return program
