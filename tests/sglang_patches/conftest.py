"""Session-scoped real SGLang servers (CPU platform plugin) on one tiny random Qwen3."""

from __future__ import annotations

import pytest

from tests.sglang_patches.server import launch

pytest.importorskip("sglang")

# Qwen3 normalises q and k per head (qk-norm), so a random init attends almost uniformly and sparse
# decoding would change nothing visible. Larger norm gains make attention peaked, like a trained model's.
QK_NORM_GAIN = 3.0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from sparrow_megatron.models.tiny import make_tiny_qwen3

    path = make_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"))
    weights_file = path / "model.safetensors"
    weights = load_file(weights_file)
    for name in weights:
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            weights[name] = weights[name] * QK_NORM_GAIN
    save_file(weights, weights_file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def torch_native_server(tiny_model, tmp_path_factory):
    server = launch(tiny_model, tmp_path_factory.mktemp("logs") / "torch_native.log", "torch_native")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def record_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sparrow_records")


@pytest.fixture(scope="session")
def sparrow_server(tiny_model, tmp_path_factory, record_dir):
    log = tmp_path_factory.mktemp("logs") / "sparrow.log"
    server = launch(tiny_model, log, "sparrow", extra_env={"SPARROW_RECORD_DIR": str(record_dir)})
    yield server
    server.stop()
