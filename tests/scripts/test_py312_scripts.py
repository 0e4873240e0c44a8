"""scripts/test_py312.sh without a Python 3.12: skipped with a message locally, a failure under CI=true
(CI must not pass without having run the trainer tests under the GPU image's megatron-core)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env_without_python312(tmp_path):
    """A PATH holding only the tools the scripts call before they look for Python, and no pyenv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "ls", "sort"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return {"PATH": str(bin_dir), "PYENV_ROOT": str(tmp_path / "no-pyenv"), "HOME": str(tmp_path)}


def _run(script: str, env: dict) -> subprocess.CompletedProcess:
    bash = shutil.which("bash")
    return subprocess.run([bash, str(REPO / "scripts" / script)], env=env, capture_output=True, text=True)


def test_without_python312_the_step_is_skipped_locally(env_without_python312):
    setup = _run("setup_py312.sh", env_without_python312)
    assert setup.returncode == 3 and "SKIPPED: no Python 3.12" in setup.stderr
    test = _run("test_py312.sh", env_without_python312)
    assert test.returncode == 0 and "SKIPPED: no Python 3.12" in test.stderr


def test_without_python312_ci_fails(env_without_python312):
    test = _run("test_py312.sh", {**env_without_python312, "CI": "true"})
    assert test.returncode == 1 and "ERROR: no Python 3.12" in test.stderr
