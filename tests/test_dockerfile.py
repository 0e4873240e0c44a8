"""What can be checked of the Dockerfile without a Docker engine: pins exist on PyPI (skipped when the
index is unreachable), the image tag matches the launch default, non-root user, `sparrow` entrypoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparrow_megatron.launch.spec import DEFAULT_IMAGE

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"
PINS = {
    "SGLANG_VERSION": "sglang",
    "MEGATRON_CORE_VERSION": "megatron-core",
    "TRANSFORMER_ENGINE_VERSION": "transformer-engine",
    "FLASH_ATTN_VERSION": "flash-attn",
    "NEMO_RUN_VERSION": "nemo-run",
    "LEPTONAI_VERSION": "leptonai",
    "MLFLOW_VERSION": "mlflow",
}


def args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    assert set(PINS) <= set(args())
    assert args()["SGLANG_VERSION"] == "0.5.23"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M) and ":" in args()["BASE_IMAGE"]
    assert f"docker build -t {DEFAULT_IMAGE} ." in text
    assert re.search(r"^USER (?!root)\w+$", text, flags=re.M)
    assert 'ENTRYPOINT ["sparrow"]' in text
    for name in PINS:
        assert f"=${{{name}}}" in text, f"{name} is declared but not used"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arg", sorted(PINS))
def test_pinned_version_exists_on_pypi(arg):
    package, version = PINS[arg], args()[arg]
    # The image runs Python 3.12: ask the index for what 3.12 can install.
    cmd = [sys.executable, "-m", "pip", "index", "versions", package, "--python-version", "3.12"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("package index unreachable (timeout)")
    if out.returncode != 0 and ("No matching distribution" not in out.stderr):
        pytest.skip(f"package index unreachable: {out.stderr.strip()[-200:]}")
    available = re.search(r"Available versions: (.*)", out.stdout)
    assert available, f"{package}: no versions listed\n{out.stdout}\n{out.stderr}"
    versions = [v.strip() for v in available.group(1).split(",")]
    assert version in versions, f"{package}=={version} not on the index"
