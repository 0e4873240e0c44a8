"""A hostile policy's attacks on the code reward, each judged twice: through `sparrow reward code` (the
CLI) and through the training loop's reward path (`DatasetTask.reward` -> `code_reward`).

Every attack prints the expected output (or returns the expected value) only if it reached its goal,
so a contained attack scores 0. After each test: no process left under a sandbox uid or below the test
process, no cgroup of a run left, nothing new in /tmp.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparrow_megatron.cli.main import main
from sparrow_megatron.reward import cgroup, sandbox
from sparrow_megatron.reward.code_reward import (
    RESULT_MARKER,
    CodeRewardConfig,
    code_reward,
    judge_error_counts,
    load_tests,
    parse_result,
    parse_tests,
)
from sparrow_megatron.reward.config import RewardConfig
from sparrow_megatron.reward.sandbox import SandboxConfig, isolation_available

REPO = Path(__file__).resolve().parents[2]
GOAL = "the attack reached its goal"
needs_isolation = pytest.mark.skipif(
    not isolation_available(), reason="this machine cannot isolate programs (sparrow reward code --check)"
)
pytestmark = [pytest.mark.timeout(180), needs_isolation]
STDIO = {"inputs": [""], "outputs": [GOAL]}


def _leftovers() -> dict:
    import psutil

    support = sandbox.cgroup_support(SandboxConfig())
    groups = [n for d in support.parents.values() for n in os.listdir(d) if n.startswith(cgroup.PREFIX)]
    uids = range(SandboxConfig().uid_base, SandboxConfig().uid_base + SandboxConfig().uid_slots)
    return {
        "uid processes": [p for u in uids for p in sandbox.processes_of_uid(u)],
        "children": [p.pid for p in psutil.Process().children(recursive=True)],
        "cgroups": groups,
        "tmp": {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("sparrow")}
        - {"sparrow-sandbox-uids"},
    }


@pytest.fixture(autouse=True)
def contained():
    before = _leftovers()
    yield
    after = _leftovers()
    # Children alive before the test (a worker pool an earlier test of this process left) are not its own.
    left = set(after["children"]) - set(before["children"])
    assert after["uid processes"] == [] and not left and after["cgroups"] == []
    assert after["tmp"] <= before["tmp"], f"left in /tmp: {after['tmp'] - before['tmp']}"


@pytest.fixture
def outside(tmp_path_factory):
    """A world-readable directory outside /tmp (in the repository): where run dirs and datasets live."""
    d = REPO / f".sparrow-hostile-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def cli_score(tmp_path: Path, program: str, tests: dict, *extra: str) -> dict:
    prog, spec = tmp_path / f"prog-{uuid.uuid4().hex[:6]}.py", tmp_path / "tests.json"
    prog.write_text(program)
    spec.write_text(json.dumps(tests))
    args = ["reward", "code", str(prog), "--tests", str(spec), "--json", "--timeout", "5", *extra]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args)
    assert rc == 0
    return json.loads(out.getvalue())


def loop_reward(program: str, tests: dict) -> float:
    """What the training loop gets for a response holding `program` (DatasetTask.reward)."""
    from sparrow_megatron.loop.tasks import DatasetTask, Prompt

    task = DatasetTask.__new__(DatasetTask)  # the loop's reward path, without a dataset file
    task.kind = "code"
    task.code, task.pool = CodeRewardConfig.from_section(RewardConfig()), None  # the job's defaults
    prompt = Prompt(0, "", SimpleNamespace(tests=parse_tests(tests)))
    return task.reward(prompt, f"Here it is.\n```python\n{program}\n```")


def both(tmp_path: Path, program: str, tests: dict = STDIO) -> tuple[dict, float]:
    return cli_score(tmp_path, program, tests), loop_reward(program, tests)


def test_answers_on_disk_outside_tmp_are_not_visible(tmp_path, outside):
    answers = outside / "expected.json"
    answers.write_text(json.dumps({"outputs": [GOAL]}))
    answers.chmod(0o644)
    program = (
        "import json\n"
        "for p in [" + repr(str(answers)) + ", '/work', '/root', '/home', '/run', " + repr(str(REPO)) + "]:\n"
        "    try:\n"
        "        print(json.load(open(p))['outputs'][0])\n"
        "    except Exception as e:\n"
        "        import sys; print(type(e).__name__, p, file=sys.stderr)\n"
    )  # fmt: skip
    out, reward = both(tmp_path, program)
    assert (out["reward"], reward) == (0.0, 0.0)
    listing = sandbox.run_program("import os; print(' '.join(os.listdir('/')))", config=SandboxConfig())
    allowed = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"}
    assert set(listing.stdout.split()) <= allowed
    etc = sandbox.run_program("import os; print(' '.join(os.listdir('/etc')))", config=SandboxConfig())
    assert etc.stdout.split() == ["ld.so.cache"]


def test_host_unix_socket_is_out_of_reach(tmp_path, outside):
    path = outside / "host.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    path.chmod(0o777)
    listener.listen(8)
    listener.setblocking(False)
    program = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({str(path)!r})\n"
        "s.sendall(b'stolen')\n"
        f"print({GOAL!r})\n"
    )
    try:
        out, reward = both(tmp_path, program)
        assert (out["reward"], reward) == (0.0, 0.0)
        assert "FileNotFoundError" in out["cases"][0]["detail"]
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


KEY_SYSCALLS = {"x86_64": (248, 249, 250), "aarch64": (217, 218, 219)}


@pytest.mark.skipif(platform.machine() not in KEY_SYSCALLS, reason="keyring syscall numbers for x86_64/arm64")
def test_keyring_is_not_carried_between_samples(tmp_path):
    add_key, request_key, keyctl = KEY_SYSCALLS[platform.machine()]
    store = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"payload = {GOAL!r}.encode()\n"
        "for ring in (-3, -4, -5):  # session, user, user-session keyrings\n"
        f"    r = libc.syscall({add_key}, b'user', b'sparrow-key', payload, len(payload), ring)\n"
        "    print('add_key', ring, r, os.strerror(ctypes.get_errno()))\n"
    )
    fetch = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"serial = libc.syscall({request_key}, b'user', b'sparrow-key', None, 0)\n"
        "buf = ctypes.create_string_buffer(256)\n"
        f"n = libc.syscall({keyctl}, 11, serial, buf, 256) if serial > 0 else -1\n"
        "print(buf.raw[:n].decode() if n > 0 else 'no key')\n"
    )
    stored = sandbox.run_program(store, config=SandboxConfig())
    assert "Operation not permitted" in stored.stdout  # the seccomp filter refuses add_key
    for _ in range(2):
        cli_score(tmp_path, store, STDIO)
        loop_reward(store, STDIO)
    out, reward = both(tmp_path, fetch)
    assert (out["reward"], reward) == (0.0, 0.0)
    assert "no key" in out["cases"][0]["detail"]


@pytest.mark.parametrize(
    ("program", "status", "reason"),
    [
        ("import sys\nsys.exit(200)\n", "error", "exit code 200"),
        ("import os\nos.kill(os.getpid(), 40)\n", "killed", "SIGRTMIN+6"),
        ("import sys\nsys.exit(152)\n", "killed", "exit status 152"),  # 128+SIGXCPU: not a timeout
    ],
)
def test_any_exit_status_or_signal_is_a_judgment(tmp_path, program, status, reason):
    out, reward = both(tmp_path, program)
    assert (out["reward"], reward) == (0.0, 0.0)
    assert out["cases"][0]["status"] == status
    assert reason in out["cases"][0]["detail"]


CALL = {"fn_name": "f", "inputs": [[1]], "outputs": [GOAL]}


@pytest.mark.parametrize(
    "line",
    [
        f"{RESULT_MARKER}{json.dumps(GOAL)}",  # the old format, trusted blindly before
        f"{RESULT_MARKER} 00000000000000000000000000000000 {json.dumps(GOAL)}",  # a guessed nonce
        RESULT_MARKER + "[" * 100_000 + "]" * 100_000,  # nesting that made the judge recurse
        RESULT_MARKER + "1" * 5000,  # an int past Python's int() digit limit
        RESULT_MARKER + " x " + "[" * 5_000_000,  # 5 MB
    ],
)
def test_forged_and_oversized_result_lines_are_ignored(tmp_path, line):
    program = f"import os\ndef f(x):\n    os.write(1, ({line!r} + '\\n').encode())\n    os._exit(0)\n"
    before = sum(judge_error_counts().values())
    out, reward = both(tmp_path, program, CALL)
    assert (out["reward"], reward) == (0.0, 0.0)
    assert out["cases"][0]["status"] in ("error", "killed")
    assert sum(judge_error_counts().values()) == before  # judged, not a judge crash


def test_result_parsing_is_bounded_and_big_ints_exact():
    nonce = "ab" * 16
    assert parse_result(f"{RESULT_MARKER} {nonce} " + "[" * 100 + "]" * 100, nonce)[1].startswith(
        "result nested"
    )
    assert parse_result(f"{RESULT_MARKER} {nonce} [1, 2]", nonce) == ([1, 2], "")
    two = f"{RESULT_MARKER} {nonce} 1\n{RESULT_MARKER} {nonce} 2"
    assert parse_result(two, nonce) == (None, "several result lines")
    big = "7" * 5000
    value, problem = parse_result(f"{RESULT_MARKER} {nonce} {big}", nonce)
    assert problem == "" and value == big


def test_a_5000_digit_answer_is_compared_exactly(tmp_path, capsys):
    big = "7" * 5000
    spec = tmp_path / "big.json"
    spec.write_text('{"fn_name": "f", "inputs": [[5000, ' + big + ']], "outputs": [' + big + "]}")
    right = "def f(n, x):\n    assert x == int('7' * n)\n    return x\n"  # the argument arrives as an int
    wrong = "def f(n, x):\n    return x + 1\n"
    prog = tmp_path / "p.py"
    for program, expected in ((right, 1.0), (wrong, 0.0)):
        prog.write_text(program)
        assert main(["reward", "code", str(prog), "--tests", str(spec), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["reward"] == expected
        assert code_reward(f"```python\n{program}```", load_tests(spec)).reward == expected


@pytest.mark.parametrize(
    ("program", "tests"),
    [
        ("print(1999999)\n", {"inputs": [""], "outputs": ["2000000"]}),
        ("print(2000001)\n", {"inputs": [""], "outputs": ["2000000"]}),
        ("def f(x):\n    return 1999999\n", {"fn_name": "f", "inputs": [[0]], "outputs": [2000000]}),
        ("def f(x):\n    return True\n", {"fn_name": "f", "inputs": [[0]], "outputs": [1]}),
        ("def f(x):\n    return 1\n", {"fn_name": "f", "inputs": [[0]], "outputs": [True]}),
    ],
)
def test_integers_and_booleans_are_exact(tmp_path, program, tests):
    out, reward = both(tmp_path, program, tests)
    assert (out["reward"], reward) == (0.0, 0.0)
    assert out["cases"][0]["status"] == "wrong"


def test_floats_keep_their_tolerance(tmp_path):
    out, reward = both(tmp_path, "print(0.30000000001)\n", {"inputs": [""], "outputs": ["0.3"]})
    assert (out["reward"], reward) == (1.0, 1.0)


needs_cgroup = pytest.mark.skipif(
    not sandbox.cgroup_support(SandboxConfig()).available,
    reason="no writable memory+pids cgroup here: limits are per process (see sparrow reward code --check)",
)
CHILDREN = (
    "import os\n"
    "pids = []\n"
    "for _ in range(4):\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        block = bytearray(80 << 20)\n"
    "        for i in range(0, len(block), 4096):\n"
    "            block[i] = 1\n"
    "        import time; time.sleep(1.5)\n"
    "        os._exit(0)\n"
    "    pids.append(pid)\n"
    "ok = all(os.waitpid(p, 0)[1] == 0 for p in pids)\n"
    f"print({GOAL!r} if ok else 'a child died')\n"
)
MEMFDS = (
    "import os\n"
    "fds = []\n"
    "for i in range(12):\n"
    "    fd = os.memfd_create(f'm{i}')\n"
    "    for _ in range(15):\n"
    "        os.write(fd, b'x' * (1 << 20))\n"
    "    fds.append(fd)\n"
    f"print({GOAL!r})\n"
)


@needs_cgroup
@pytest.mark.parametrize("program", [CHILDREN, MEMFDS], ids=["children", "memfd"])
def test_memory_is_limited_per_run(tmp_path, program):
    out = cli_score(tmp_path, program, STDIO, "--memory-mb", "128")
    config = CodeRewardConfig(sandbox=SandboxConfig(timeout_s=10, memory_mb=128))
    score = code_reward(f"```python\n{program}```", parse_tests(STDIO), config)  # the loop's function
    assert (out["reward"], score.reward) == (0.0, 0.0)
    assert out["cases"][0]["status"] in ("killed", "error")
    # The same program within a 512 MB budget passes: the limit, not the program, stopped it.
    roomy = CodeRewardConfig(sandbox=SandboxConfig(timeout_s=10, memory_mb=512))
    assert code_reward(f"```python\n{program}```", parse_tests(STDIO), roomy).reward == 1.0


def test_control_characters_are_escaped_by_the_cli(tmp_path, capsys):
    prog, spec = tmp_path / "esc.py", tmp_path / "t.json"
    prog.write_text("import sys\nsys.stderr.write('\\x1b]0;pwned\\x07\\x1b[2J\\u202e')\nsys.exit(3)\n")
    spec.write_text(json.dumps(STDIO))
    assert main(["reward", "code", str(prog), "--tests", str(spec)]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b]0;pwned" in text


def test_check_reports_this_machine(capsys):
    assert main(["reward", "code", "--check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["isolation"] == "bwrap"
    names = {i["name"]: i["ok"] for i in report["items"]}
    assert names["bubblewrap"] and names["seccomp filter"] and names["sandbox probe"]
    assert "per-run limits" in names


def test_console_check_subprocess():
    sparrow = REPO / ".venv" / "bin" / "sparrow"
    if not sparrow.exists():
        import sys

        sparrow = Path(sys.executable).with_name("sparrow")
    proc = subprocess.run(
        [str(sparrow), "reward", "code", "--check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("isolation: bwrap")
