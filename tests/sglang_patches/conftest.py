"""Session-scoped real SGLang servers (CPU platform plugin) on one tiny random Qwen3."""

from __future__ import annotations

import pytest

from tests.sglang_patches.server import launch

pytest.importorskip("sglang")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from sparrow_megatron.models.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session")
def torch_native_server(tiny_model, tmp_path_factory):
    server = launch(tiny_model, tmp_path_factory.mktemp("logs") / "torch_native.log", "torch_native")
    yield server
    server.stop()
