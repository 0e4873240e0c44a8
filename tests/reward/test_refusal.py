"""No silent fallback: where the machine cannot isolate programs, code rewards refuse to run (the CLI
and the training loop's reward path alike), and only an explicit `unsafe` runs them, loudly. Runs on
every machine: the failure is a stand-in bwrap that fails like a kernel without user namespaces."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from sparrow_megatron.cli.main import main
from sparrow_megatron.reward import sandbox
from sparrow_megatron.reward.code_reward import CodeRewardConfig, code_reward, parse_tests
from sparrow_megatron.reward.sandbox import IsolationUnavailable, SandboxConfig
from tests.reward.test_hostile import GOAL, REPO, STDIO, loop_reward

pytestmark = pytest.mark.timeout(120)


def test_refusal_to_fall_back_silently(tmp_path, monkeypatch, capsys, request):
    """A bwrap that fails like a kernel without unprivileged user namespaces: code rewards refuse
    (the CLI exits 1 naming the feature, the loop's reward raises) instead of running unisolated."""
    # World-readable (the launcher runs it after dropping to a sandbox uid), outside the test's tmp.
    fake = Path(tempfile.mkdtemp(prefix="sparrow-fake-bwrap-", dir=REPO)) / "bwrap"
    fake.parent.chmod(0o755)
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel does "
        "not allow non-privileged user namespaces.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(fake.parent))
    monkeypatch.setattr(sandbox, "_bwrap_path", lambda config: str(fake))
    monkeypatch.setattr(sandbox, "_WARNED_UNSAFE", [False])
    answer = f"print({GOAL!r})\n"
    prog, spec = tmp_path / "a.py", tmp_path / "t.json"
    prog.write_text(answer)
    spec.write_text(json.dumps(STDIO))
    for _ in range(2):  # a failed probe is not remembered as "use the fallback"
        assert main(["reward", "code", str(prog), "--tests", str(spec), "--json"]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "refuse to run without isolation" in captured.err and "user namespaces" in captured.err
        with pytest.raises(IsolationUnavailable, match="user namespaces"):
            loop_reward(answer, STDIO)
    assert main(["reward", "code", "--check"]) == 1
    assert "isolation: none" in capsys.readouterr().out
    # Only the explicit opt-out runs it, and says so.
    assert main(["reward", "code", str(prog), "--tests", str(spec), "--json", "--isolation", "unsafe"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["reward"] == 1.0
    assert "WITHOUT isolation" in captured.err
    unsafe = CodeRewardConfig(sandbox=SandboxConfig(isolation="unsafe"))
    assert code_reward(f"```python\n{answer}```", parse_tests(STDIO), unsafe).reward == 1.0
