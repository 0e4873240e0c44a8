import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparrow_megatron.cli.main import main
from sparrow_megatron.reward.sandbox import isolation_available

pytestmark = pytest.mark.timeout(180)
needs_isolation = pytest.mark.skipif(
    not isolation_available(),
    reason="this machine cannot isolate programs (sparrow reward code --check); tests/reward/test_refusal.py "
    "covers the refusal",
)
REPO = Path(__file__).resolve().parents[2]
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "resp.txt").write_text("<think>\\boxed{1}</think>So the answer is \\boxed{\\frac{1}{2}}.")
    (tmp_path / "add.py").write_text(ADD)
    (tmp_path / "stdio.json").write_text(json.dumps({"inputs": ["1 2\n", "2 2\n"], "outputs": ["3", "5"]}))
    (tmp_path / "call.json").write_text(
        json.dumps({"fn_name": "sq", "inputs": [[3], [4]], "outputs": [9, [16]]})
    )
    (tmp_path / "sq.py").write_text("def sq(x):\n    return x * x\n")
    (tmp_path / "bomb.py").write_text(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    return tmp_path


def test_math_json(files, capsys):
    assert main(["reward", "math", "--response", str(files / "resp.txt"), "--answer", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "reward": 1,
        "reason": "correct",
        "extracted": "\\frac{1}{2}",
    }
    assert main(["reward", "math", "--response", str(files / "resp.txt"), "--answer", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reward"] == 0


def test_math_text_output_and_errors(files, capsys):
    assert main(["reward", "math", "--response", str(files / "resp.txt"), "--answer", "1/2"]) == 0
    assert capsys.readouterr().out.startswith("reward 1 (correct)")
    assert main(["reward", "math", "--response", str(files / "nope.txt"), "--answer", "1"]) == 2
    assert "nope.txt: cannot read response" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["reward", "math", "--response", str(files / "resp.txt")])
    assert exc.value.code == 2


@needs_isolation
def test_code_stdio_and_call_based(files, capsys):
    assert (
        main(["reward", "code", str(files / "add.py"), "--tests", str(files / "stdio.json"), "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert (out["reward"], out["passed"], out["total"]) == (0.5, 1, 2)
    assert [c["status"] for c in out["cases"]] == ["ok", "wrong"]
    assert main(["reward", "code", str(files / "sq.py"), "--tests", str(files / "call.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reward"] == 1.0
    args = ["reward", "code", str(files / "add.py"), "--tests", str(files / "stdio.json"), "--all-or-nothing"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("reward 0.000: 1/2 cases passed")


@needs_isolation
def test_code_malicious_program_is_a_judgment(files, capsys):
    args = [
        "reward",
        "code",
        str(files / "bomb.py"),
        "--tests",
        str(files / "stdio.json"),
        "--json",
        "--timeout",
        "2",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reward"] == 0.0
    assert {c["status"] for c in out["cases"]} <= {"timeout", "killed"}


def test_code_bad_arguments_exit_2(files, capsys):
    assert main(["reward", "code", str(files / "add.py"), "--tests", str(files / "missing.json")]) == 2
    assert "missing.json: cannot read tests file" in capsys.readouterr().err
    (files / "bad.json").write_text(json.dumps({"inputs": ["1"], "outputs": []}))
    assert main(["reward", "code", str(files / "add.py"), "--tests", str(files / "bad.json")]) == 2
    assert "1 inputs but 0 outputs" in capsys.readouterr().err
    assert main(["reward", "code", str(files / "nope.py"), "--tests", str(files / "stdio.json")]) == 2
    assert (
        main(
            ["reward", "code", str(files / "add.py"), "--tests", str(files / "stdio.json"), "--timeout", "0"]
        )
        == 2
    )
    assert main(["reward", "code", str(files / "add.py")]) == 2
    assert "give PROGRAM.py and --tests" in capsys.readouterr().err
    assert main(["reward", "code", "--tests", str(files / "stdio.json")]) == 2
    assert (
        main(
            [
                "reward",
                "code",
                str(files / "add.py"),
                "--tests",
                str(files / "stdio.json"),
                "--memory-mb",
                "1",
            ]
        )
        == 2
    )
    assert "--memory-mb must be >= 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "reward",
                "code",
                str(files / "add.py"),
                "--tests",
                str(files / "stdio.json"),
                "--isolation",
                "auto",
            ]
        )
    assert exc.value.code == 2


@needs_isolation
def test_code_text_output_escapes_what_the_program_printed(files, capsys):
    (files / "esc.py").write_text("import sys\nsys.stderr.write('\\x1b[31mred\\r\\x1b[0m')\nsys.exit(1)\n")
    assert main(["reward", "code", str(files / "esc.py"), "--tests", str(files / "stdio.json")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert "\\x1b[31mred\\r\\x1b[0m" in out


def test_code_check_reports_isolation(capsys):
    rc = main(["reward", "code", "--check"])
    out = capsys.readouterr().out
    assert out.startswith("isolation: ")
    assert rc == (0 if out.startswith("isolation: bwrap") else 1)
    for item in ("bubblewrap", "seccomp filter", "sandbox probe", "uid per run", "per-run limits"):
        assert f"] {item}: " in out


@needs_isolation
def test_console_script_subprocess(files):
    sparrow = REPO / ".venv" / "bin" / "sparrow"
    if not sparrow.exists():
        sparrow = Path(sys.executable).with_name("sparrow")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        str(sparrow),
        "reward",
        "code",
        str(files / "add.py"),
        "--tests",
        str(files / "stdio.json"),
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] == 1
    bad = subprocess.run(
        [str(sparrow), "reward", "math", "--answer", "1"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
